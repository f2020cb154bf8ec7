//! QEMU's `isa-debug-exit` at iobase 0xf4: a write of value `v` ends the VM with process
//! status `(v << 1) | 1`, so one guest reports pass/fail the same way under both VMMs.

use crate::vmm::bus::BusDevice;
use crate::vmm::exit::{ExitHandle, ExitReason};

pub const DEBUG_EXIT_PORT: u64 = 0xf4;
pub const DEBUG_EXIT_SIZE: u64 = 4;

pub struct DebugExit {
    exit: ExitHandle,
}

impl DebugExit {
    pub fn new(exit: ExitHandle) -> Self {
        DebugExit { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.exit.request(ExitReason::DebugExit {
            code: u32::from_le_bytes(v),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_debug_exit_write_requests_exit_with_code() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = DebugExit::new(exit.clone());
        dev.write(0, &[3]);
        assert_eq!(exit.reason(), Some(ExitReason::DebugExit { code: 3 }));
        assert_eq!(exit.reason().unwrap().status(), 7);
    }
}
