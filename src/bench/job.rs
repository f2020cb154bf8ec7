//! A benchmark job and the blkbench command line it becomes.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rw {
    RandRead,
    RandWrite,
    Read,
    Write,
    RandRw,
}

impl Rw {
    pub fn as_str(self) -> &'static str {
        match self {
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRw => "randrw",
        }
    }
}

impl std::str::FromStr for Rw {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randrw" => Rw::RandRw,
            _ => {
                return Err(format!(
                    "unknown --rw '{s}' (randread, randwrite, read, write, randrw)"
                ))
            }
        })
    }
}

/// One load the guest runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub rw: Rw,
    pub bs: u64,
    pub qd: u32,
    pub queues: u32,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub verify: bool,
    /// The guest waits for each queue's MSI-X interrupt instead of polling (blkbench irq=1).
    pub irq: bool,
}

impl Job {
    /// The default matrix: the four jobs that characterise a block path.
    pub fn default_matrix(runtime_s: f64) -> Vec<Job> {
        let j = |rw, bs, qd| Job {
            rw,
            bs,
            qd,
            queues: 1,
            runtime_s,
            ramp_s: 0.5,
            verify: false,
            irq: false,
        };
        vec![
            j(Rw::RandRead, 4096, 1),
            j(Rw::RandRead, 4096, 32),
            j(Rw::RandWrite, 4096, 32),
            j(Rw::Read, 128 << 10, 8),
        ]
    }

    /// blkbench's kernel command line for this job.
    pub fn cmdline(&self) -> String {
        let mut s = format!(
            "rw={} bs={} qd={} queues={} runtime={} ramp={}",
            self.rw.as_str(),
            self.bs,
            self.qd,
            self.queues,
            self.runtime_s,
            self.ramp_s
        );
        if self.verify {
            s.push_str(" verify=1");
        }
        if self.irq {
            s.push_str(" irq=1");
        }
        s
    }

    /// Short label, e.g. "4k randread qd32".
    pub fn label(&self) -> String {
        let bs = if self.bs % 1024 == 0 {
            format!("{}k", self.bs / 1024)
        } else {
            format!("{}", self.bs)
        };
        let q = if self.queues > 1 {
            format!(" x{}q", self.queues)
        } else {
            String::new()
        };
        let irq = if self.irq { " irq" } else { "" };
        format!("{bs} {} qd{}{q}{irq}", self.rw.as_str(), self.qd)
    }
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_default_matrix_is_the_documented_four_jobs() {
        let m: Vec<String> = Job::default_matrix(3.0).iter().map(|j| j.label()).collect();
        assert_eq!(
            m,
            [
                "4k randread qd1",
                "4k randread qd32",
                "4k randwrite qd32",
                "128k read qd8"
            ]
        );
    }

    #[test]
    fn test_cmdline_carries_every_parameter() {
        let j = Job {
            rw: Rw::RandWrite,
            bs: 8192,
            qd: 4,
            queues: 2,
            runtime_s: 1.5,
            ramp_s: 0.0,
            verify: true,
            irq: true,
        };
        assert_eq!(
            j.cmdline(),
            "rw=randwrite bs=8192 qd=4 queues=2 runtime=1.5 ramp=0 verify=1 irq=1"
        );
        assert_eq!(j.label(), "8k randwrite qd4 x2q irq");
    }

    #[test]
    fn test_polled_job_cmdline_and_label_have_no_irq() {
        let j = &Job::default_matrix(1.0)[0];
        assert!(!j.cmdline().contains("irq"), "{}", j.cmdline());
        assert!(!j.label().contains("irq"), "{}", j.label());
    }
}
