"""Adapters that run the blkbench guest under VMMs given by path (Cloud Hypervisor,
Firecracker) for perf/compare, and what they share: the guest's command line, thread
pinning by /proc/PID/task/*/comm and taskset, and stopping a VMM that has no
isa-debug-exit once blkbench's JSON line has arrived on the serial console.

Nothing of those VMMs is in this repository: their binaries are given by path
(`perf/compare --vmm ch=PATH,fc=PATH`)."""

import json
import os
import re
import signal
import subprocess
import tempfile
import time

RESULT_PREFIX = '{"blkbench":'
# Thread names: (pattern on /proc/PID/task/*/comm, role). vCPU threads go to the vCPU core,
# I/O threads (the ones that serve the disk's queues) to the I/O core.
CH_THREADS = [(re.compile(r"^vcpu\d+$"), "vcpu"), (re.compile(r"^_disk\d+_q\d+$"), "io")]
# Firecracker serves every device from its main thread's event loop ("firecracker"); the
# vCPUs are "fc_vcpu N".
FC_THREADS = [(re.compile(r"^fc_vcpu \d+$"), "vcpu"), (re.compile(r"^firecracker$"), "io")]
# How long threads are still scanned after every role was seen.
PIN_SETTLE_S = 1.0


class PeerError(Exception):
    """A peer VMM run that produced no blkbench result."""


def host_tsc_khz():
    """The TSC rate to tell blkbench (tsc_khz=) where the VMM may not publish CPUID leaf
    0x40000010: the kernel's tsc_freq_khz when exported, else /proc/cpuinfo's cpu MHz of
    CPU 0 (the TSC rate on constant-TSC hosts such as this lab's)."""
    try:
        return int(open("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read())
    except (OSError, ValueError):
        pass
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return None


def guest_params(base, extra, tsc_khz=None):
    """blkbench's command line: the job, then --guest-params (later keys win in blkbench),
    then tsc_khz= unless the user gave one."""
    words = base.split() + extra.split()
    if tsc_khz and not any(w.startswith("tsc_khz=") for w in words):
        words.append(f"tsc_khz={tsc_khz}")
    return " ".join(words)


def threads(pid):
    """(tid, comm) of every thread of `pid`."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out.append((int(tid), open(f"/proc/{pid}/task/{tid}/comm").read().strip()))
            except OSError:
                continue
    except OSError:
        pass
    return out


class Pinner:
    """Pins a VMM's threads by name as they appear: each pattern's threads to its core."""

    def __init__(self, pid, rules, cores, dry=False):
        self.pid, self.rules, self.cores, self.dry = pid, rules, cores, dry
        self.pinned, self.errors = {}, []

    def pass_(self):
        """One scan; returns whether every rule has matched at least one thread."""
        seen = set()
        for tid, comm in threads(self.pid):
            for pat, role in self.rules:
                if not pat.match(comm):
                    continue
                seen.add(role)
                # A new thread carries its parent's name until it names itself: pin again
                # when the name changed (Firecracker's "fc_vcpu 0" starts as "firecracker").
                if self.pinned.get(tid, ("",))[0] == comm:
                    continue
                core = self.cores[role]
                p = subprocess.run(["taskset", "-p", "-c", str(core), str(tid)],
                                   capture_output=True, text=True)
                if p.returncode == 0:
                    self.pinned[tid] = (comm, core)
                else:
                    self.errors.append(f"{comm} ({tid}): {p.stderr.strip()}")
                    self.pinned[tid] = (comm, None)
        return all(role in seen for _, role in self.rules)

    def report(self, name):
        """One line: what was pinned where, and what was not (threads no rule names)."""
        done = sorted({f"{c}→{core}" for c, core in self.pinned.values() if core is not None})
        # Threads no rule names (a rebooted guest's new vCPU threads are not "others").
        others = sorted({comm for _, comm in threads(self.pid)
                         if not any(pat.match(comm) for pat, _ in self.rules)})
        missing = [role for pat, role in self.rules
                   if not any(pat.match(c) for c, _ in self.pinned.values())]
        msg = f"{name}: pinned {', '.join(done) or 'nothing'}"
        if others:
            msg += f"; not pinned (no option or rule for them): {', '.join(others)}"
        if missing:
            msg += f"; never saw a thread for: {', '.join(missing)}"
        if self.errors:
            msg += f"; taskset failed: {'; '.join(self.errors)}"
        return msg


def run_until_result(name, cmd, console_path, rules, cores, timeout_s, log=print):
    """Starts `cmd`, pins its threads as they appear, waits for blkbench's JSON line in
    `console_path` (the VMM's serial output; None: the VMM's stdout), then stops the VMM
    (SIGTERM, then SIGKILL): neither peer has isa-debug-exit, and on the guest's exit they
    reset (Cloud Hypervisor reboots it) or stop. Returns (result dict, console text)."""
    # stdout (the serial console where `console_path` is None) apart from stderr (the VMM's
    # log), so no log line lands inside the JSON line.
    out = tempfile.NamedTemporaryFile(prefix=f"compare-{name}-", suffix=".out", delete=False)
    err = tempfile.NamedTemporaryFile(prefix=f"compare-{name}-", suffix=".err", delete=False)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    pinner = Pinner(proc.pid, rules, cores)
    path = console_path or out.name
    deadline = time.time() + timeout_s
    all_pinned, settled = False, None
    line = None
    try:
        while time.time() < deadline:
            # Scanned until a while after every role has a thread: a new thread carries its
            # parent's name until it names itself. Then only the console is read.
            if settled is None or time.time() < settled:
                all_pinned = pinner.pass_()
                if all_pinned and settled is None:
                    settled = time.time() + PIN_SETTLE_S
            # Only a line that ends in a newline is complete (the serial writes byte by byte).
            line = _result_line(_read(path), complete=True)
            if line is not None:
                break
            if proc.poll() is not None:
                line = _result_line(_read(path), complete=False)
                break
            time.sleep(0.01 if not all_pinned else 0.1)
        log(pinner.report(name))
    finally:
        _stop(proc)
        out.close()
        err.close()
    console = _read(path)
    vmm_log = _read(out.name) + _read(err.name)
    os.unlink(out.name)
    os.unlink(err.name)
    if line is None:
        why = "timed out" if proc.returncode in (None, -signal.SIGTERM, -signal.SIGKILL) else f"exited {proc.returncode}"
        tail = "\n".join((console + "\n" + vmm_log).strip().splitlines()[-8:])
        raise PeerError(f"{name}: no blkbench result ({why} after {timeout_s:.0f} s); last output:\n{tail}")
    try:
        return json.loads(line), console
    except json.JSONDecodeError as e:
        raise PeerError(f"{name}: blkbench's result line is not JSON ({e})") from e


def _result_line(text, complete):
    """blkbench's JSON line in `text`; with `complete`, only once its newline has arrived."""
    for l in text.splitlines(keepends=True):
        if l.startswith(RESULT_PREFIX) and (l.endswith("\n") or not complete):
            return l.strip()
    return None


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _stop(proc):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ch_command(binary, kernel, params, disk, queues, qsize, memory_mib, cores, direct=True):
    """Cloud Hypervisor: PVH --kernel, one vCPU pinned by --cpus affinity, each queue's
    thread pinned by the disk's queue_affinity, COM1 on its stdout (`tty`; a `file=` is
    created anew when the guest's triple fault reboots the VM, which can take the result
    line with it), no virtio console."""
    affinity = ",".join(f"{q}@[{cores['io']}]" for q in range(queues))
    # image_type=raw: with an autodetected raw image Cloud Hypervisor fails writes to
    # sector 0 (a guard against format probing).
    disk_opt = (f"path={disk},num_queues={queues},queue_size={qsize},direct={'on' if direct else 'off'},"
                f"image_type=raw,queue_affinity=[{affinity}]")
    return [binary, "--kernel", kernel, "--cmdline", params,
            "--cpus", f"boot=1,affinity=[0@[{cores['vcpu']}]]",
            "--memory", f"size={memory_mib}M",
            "--disk", disk_opt,
            "--serial", "tty", "--console", "off"]


def fc_config(kernel, params, disk, memory_mib, io_engine="Async"):
    """Firecracker's --config-file: the blkbench ELF as a PVH kernel, one non-root drive
    (Async = io_uring), one vCPU. Firecracker's virtio-blk has one queue and no O_DIRECT
    option; its serial console is its stdout."""
    return {
        "boot-source": {"kernel_image_path": kernel, "boot_args": params},
        "drives": [{"drive_id": "disk0", "path_on_host": disk, "is_root_device": False,
                    "is_read_only": False, "io_engine": io_engine}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": memory_mib, "smt": False},
    }


def fc_command(binary, config_path):
    return [binary, "--no-api", "--config-file", config_path, "--enable-pci", "--level", "Warning"]
