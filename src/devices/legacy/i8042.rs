//! Just enough of the i8042 keyboard controller for a guest to reset the machine
//! (command 0xfe on port 0x64) and for Linux's probe to find no keyboard.

use crate::vmm::bus::BusDevice;
use crate::vmm::exit::{ExitHandle, ExitReason};

/// The controller occupies ports 0x60..=0x64; registered as one 5-byte range.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_SIZE: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET: u8 = 0xfe;

pub struct I8042 {
    exit: ExitHandle,
}

impl I8042 {
    pub fn new(exit: ExitHandle) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data port reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET) {
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_i8042_reset_command_requests_reset() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None, "0xfe on the data port is not a reset");
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
