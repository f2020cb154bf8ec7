//! The three modes over the polled driver: answering ARP and ICMP echo
//! requests in every mode, resolving the peer, timing pings, flooding UDP.

use super::nic::Nic;
use ringvm_guests::arch::rdtsc;
use ringvm_guests::bench::netparams::{Mode, NetParams};
use ringvm_guests::hist::Histogram;
use ringvm_guests::netproto::{self, Ip, Mac, Route, Rx, MAX_PAYLOAD};
use ringvm_guests::tsc::Clock;

/// ARP requests for the peer, and the wait for a reply after each.
pub const ARP_TRIES: u32 = 5;
pub const ARP_RETRY_NS: u64 = 500_000_000;
/// Transmit descriptors held by the device this long with no completion: stuck.
pub const TX_WATCHDOG_NS: u64 = 10_000_000_000;
/// After a flood, how long to wait for the device to finish what it holds.
const DRAIN_NS: u64 = 1_000_000_000;
/// Echo request identifier ("RV").
pub const PING_ID: u16 = 0x5256;
/// UDP source port of the flood.
pub const FLOOD_SPORT: u16 = 40000;

/// Why a run could not complete.
pub enum RunError {
    /// No ARP reply from the peer after ARP_TRIES requests.
    PeerUnresolved,
    /// The device held transmit descriptors for TX_WATCHDOG_NS without completing one.
    TxStalled,
}

/// Counts over the run.
#[derive(Default)]
pub struct Stats {
    /// ping: echo requests sent / matching replies / requests with no reply in time.
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    /// Replies that came after their timeout, duplicates, or for another id/peer.
    pub stray_replies: u64,
    pub rx_arp: u64,
    pub rx_icmp: u64,
    pub rx_other: u64,
    /// Malformed frames, bad IPv4/ICMP checksums.
    pub rx_bad: u64,
    pub arp_requests_sent: u64,
    pub arp_replies_sent: u64,
    pub echo_replies_sent: u64,
    /// Echo requests too large to answer from one transmit buffer (jumbo frames): counted,
    /// checksums verified, not answered.
    pub echo_too_big: u64,
    /// Control frames not sent because every control descriptor was in flight.
    pub tx_dropped: u64,
    /// flood: datagrams completed by the device, their payload and frame bytes.
    pub udp_packets: u64,
    pub udp_bytes: u64,
    pub udp_frame_bytes: u64,
    /// Time to resolve the peer's MAC (0 when not needed or learned earlier).
    pub arp_ns: u64,
    /// Measured window, TSC: first request/datagram → last reply/completion.
    pub start_tsc: u64,
    pub end_tsc: u64,
}

/// A ping waiting for its reply.
#[derive(Clone, Copy)]
struct Outstanding {
    seq: u16,
    tsc: u64,
}

pub struct Bench<'h> {
    pub nic: Nic,
    pub p: NetParams,
    clock: Clock,
    pub mac: Mac,
    pub peer_mac: Option<Mac>,
    ip_id: u16,
    outstanding: Option<Outstanding>,
    hist: &'h mut Histogram,
    pub stats: Stats,
    payload: [u8; MAX_PAYLOAD],
}

impl<'h> Bench<'h> {
    pub fn new(nic: Nic, p: NetParams, clock: Clock, mac: Mac, hist: &'h mut Histogram) -> Self {
        let mut payload = [0u8; MAX_PAYLOAD];
        netproto::fill_pattern(&mut payload);
        Bench { nic, p, clock, mac, peer_mac: None, ip_id: 0, outstanding: None, hist, stats: Stats::default(), payload }
    }

    pub fn hist(&self) -> &Histogram {
        self.hist
    }

    /// Runs the mode the parameters name.
    pub fn run(&mut self) -> Result<(), RunError> {
        self.nic.start();
        match self.p.mode {
            Mode::Ping => {
                self.resolve_peer()?;
                self.ping()
            }
            Mode::Flood => {
                self.resolve_peer()?;
                self.flood()
            }
            Mode::Echo => {
                self.echo();
                Ok(())
            }
        }
    }

    fn route(&self, dst_mac: Mac, dst_ip: Ip) -> Route {
        Route { src_mac: self.mac, dst_mac, src_ip: self.p.ip, dst_ip }
    }

    fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    /// Sends one control frame now (built by `build`); false if no descriptor was free.
    fn send_ctrl(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let slot = match self.nic.take_ctrl() {
            Some(s) => Some(s),
            None => {
                self.nic.reap_tx();
                self.nic.take_ctrl()
            }
        };
        let Some(mut slot) = slot else {
            self.stats.tx_dropped += 1;
            return false;
        };
        let len = build(slot.frame_mut());
        self.nic.send(slot, len);
        self.nic.flush_tx();
        true
    }

    /// Handles every frame the device has delivered: answers ARP and echo
    /// requests, learns the peer's MAC, matches the outstanding ping.
    fn service_rx(&mut self) {
        let mut any = false;
        while let Some(frame) = self.nic.poll_rx() {
            any = true;
            let (mac, ip, peer) = (self.mac, self.p.ip, self.p.peer);
            match netproto::parse(frame.data(), &mac, &ip) {
                Rx::ArpRequest { sender_mac, sender_ip } => {
                    self.stats.rx_arp += 1;
                    if sender_ip == peer {
                        self.peer_mac = Some(sender_mac);
                    }
                    if self.send_ctrl(|b| netproto::arp_reply(b, &mac, &ip, &sender_mac, &sender_ip)) {
                        self.stats.arp_replies_sent += 1;
                    }
                }
                Rx::ArpReply { sender_mac, sender_ip } => {
                    self.stats.rx_arp += 1;
                    if sender_ip == peer {
                        self.peer_mac = Some(sender_mac);
                    }
                }
                Rx::ArpOther => self.stats.rx_arp += 1,
                Rx::EchoRequest { payload, .. } if payload.len() > MAX_PAYLOAD => {
                    self.stats.rx_icmp += 1;
                    self.stats.echo_too_big += 1;
                }
                Rx::EchoRequest { src_mac, src_ip, id, seq, payload } => {
                    self.stats.rx_icmp += 1;
                    let r = self.route(src_mac, src_ip);
                    let ip_id = self.next_ip_id();
                    if self.send_ctrl(|b| netproto::icmp_echo(b, &r, true, id, seq, ip_id, payload)) {
                        self.stats.echo_replies_sent += 1;
                    }
                }
                Rx::EchoReply { src_ip, id, seq } => {
                    self.stats.rx_icmp += 1;
                    match self.outstanding {
                        Some(o) if id == PING_ID && seq == o.seq && src_ip == peer => {
                            self.hist.record(self.clock.cycles_to_ns(frame.tsc.wrapping_sub(o.tsc)));
                            self.stats.received += 1;
                            self.stats.end_tsc = frame.tsc;
                            self.outstanding = None;
                        }
                        _ => self.stats.stray_replies += 1,
                    }
                }
                Rx::IcmpOther => self.stats.rx_icmp += 1,
                Rx::Other => self.stats.rx_other += 1,
                Rx::Bad => self.stats.rx_bad += 1,
            }
            self.nic.recycle(frame);
        }
        if any {
            self.nic.flush_rx();
        }
    }

    /// Finds the peer's MAC by ARP (unless an ARP request from it taught us already).
    fn resolve_peer(&mut self) -> Result<(), RunError> {
        let start = rdtsc();
        self.service_rx();
        let retry = self.clock.ns_to_cycles(ARP_RETRY_NS);
        for _ in 0..ARP_TRIES {
            if self.peer_mac.is_some() {
                break;
            }
            let (mac, ip, peer) = (self.mac, self.p.ip, self.p.peer);
            if self.send_ctrl(|b| netproto::arp_request(b, &mac, &ip, &peer)) {
                self.stats.arp_requests_sent += 1;
            }
            let sent = rdtsc();
            while self.peer_mac.is_none() && rdtsc().wrapping_sub(sent) < retry {
                self.service_rx();
                self.nic.reap_tx();
            }
        }
        if self.peer_mac.is_none() {
            return Err(RunError::PeerUnresolved);
        }
        self.stats.arp_ns = self.clock.cycles_to_ns(rdtsc().wrapping_sub(start));
        Ok(())
    }

    /// Echo requests one at a time: the next goes `interval` after the
    /// previous one was sent, but never before its reply or its timeout.
    fn ping(&mut self) -> Result<(), RunError> {
        let peer_mac = self.peer_mac.unwrap_or(netproto::BROADCAST);
        let route = self.route(peer_mac, self.p.peer);
        let interval = self.clock.ns_to_cycles(self.p.interval_ns);
        let timeout = self.clock.ns_to_cycles(self.p.timeout_ns);
        let size = self.p.size;
        let count = self.p.count.unwrap_or(u64::MAX);
        let start = rdtsc();
        let end = self.p.runtime_ns.map_or(u64::MAX, |ns| start.saturating_add(self.clock.ns_to_cycles(ns)));
        self.stats.start_tsc = start;
        self.stats.end_tsc = start;
        let mut next_send = start;
        let mut seq: u16 = 0;
        loop {
            let now = rdtsc();
            if let Some(o) = self.outstanding {
                if now.wrapping_sub(o.tsc) > timeout {
                    self.stats.lost += 1;
                    self.outstanding = None;
                }
            }
            if self.outstanding.is_none() {
                if self.stats.sent >= count || now >= end {
                    break;
                }
                if now >= next_send {
                    seq = seq.wrapping_add(1);
                    let ip_id = self.next_ip_id();
                    let payload = &self.payload[..size];
                    let Some(mut slot) = self.nic.take_ctrl() else {
                        self.nic.reap_tx();
                        continue;
                    };
                    let len = netproto::icmp_echo(slot.frame_mut(), &route, false, PING_ID, seq, ip_id, payload);
                    self.nic.send(slot, len);
                    let tsc = rdtsc();
                    self.nic.flush_tx();
                    self.outstanding = Some(Outstanding { seq, tsc });
                    self.stats.sent += 1;
                    next_send = tsc.wrapping_add(interval);
                }
            }
            self.service_rx();
            self.nic.reap_tx();
        }
        if self.stats.received == 0 {
            self.stats.end_tsc = rdtsc();
        }
        Ok(())
    }

    /// Answers ARP and echo requests until the runtime ends or `count` requests were answered.
    fn echo(&mut self) {
        let start = rdtsc();
        let end = self.p.runtime_ns.map_or(u64::MAX, |ns| start.saturating_add(self.clock.ns_to_cycles(ns)));
        let count = self.p.count.unwrap_or(u64::MAX);
        self.stats.start_tsc = start;
        while rdtsc() < end && self.stats.echo_replies_sent < count {
            self.service_rx();
            self.nic.reap_tx();
        }
        // Let the last replies leave before the VM ends.
        let drain = rdtsc();
        while self.nic.tx_in_flight() > 0 && rdtsc().wrapping_sub(drain) < self.clock.ns_to_cycles(DRAIN_NS) {
            self.nic.reap_tx();
        }
        self.stats.end_tsc = rdtsc();
    }

    /// UDP datagrams back to back: keep every bulk descriptor on the ring,
    /// publish once per pass, count completions.
    fn flood(&mut self) -> Result<(), RunError> {
        let route = self.route(self.peer_mac.unwrap_or(netproto::BROADCAST), self.p.peer);
        let (port, size) = (self.p.port, self.p.size);
        let payload = self.payload;
        let mut frame_len = 0;
        // Identical frames (IP id 0 with DF set is fine for unfragmented datagrams).
        self.nic.fill_bulk(|b| {
            frame_len = netproto::udp(b, &route, FLOOD_SPORT, port, 0, &payload[..size]);
            frame_len
        });
        let frame_len = frame_len as u64;
        let limit = self.p.count.unwrap_or(u64::MAX);
        let start = rdtsc();
        let end = self.p.runtime_ns.map_or(u64::MAX, |ns| start.saturating_add(self.clock.ns_to_cycles(ns)));
        let watchdog = self.clock.ns_to_cycles(TX_WATCHDOG_NS);
        self.stats.start_tsc = start;
        self.stats.end_tsc = start;
        let mut submitted = 0u64;
        let mut progress = start;
        let mut now = start;
        while now < end && self.stats.udp_packets < limit {
            if submitted < limit {
                submitted += self.nic.push_bulk(limit - submitted);
                self.nic.flush_tx();
            }
            let done = self.nic.reap_tx();
            now = rdtsc();
            if done > 0 {
                self.stats.udp_packets += done;
                self.stats.end_tsc = now;
                progress = now;
            } else if self.nic.tx_in_flight() > 0 && now.wrapping_sub(progress) > watchdog {
                return Err(RunError::TxStalled);
            }
            self.service_rx();
        }
        // Count what the device still completes, briefly.
        let drain = rdtsc();
        while self.nic.tx_in_flight() > 0 && rdtsc().wrapping_sub(drain) < self.clock.ns_to_cycles(DRAIN_NS) {
            let done = self.nic.reap_tx();
            if done > 0 {
                self.stats.udp_packets += done;
                self.stats.end_tsc = rdtsc();
            }
        }
        self.stats.udp_bytes = self.stats.udp_packets * size as u64;
        self.stats.udp_frame_bytes = self.stats.udp_packets * frame_len;
        Ok(())
    }

    /// Seconds in the measured window.
    pub fn seconds(&self) -> f64 {
        self.clock.cycles_to_ns(self.stats.end_tsc.saturating_sub(self.stats.start_tsc)) as f64 / 1e9
    }
}
