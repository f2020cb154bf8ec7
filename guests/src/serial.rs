//! 8250 UART output at COM1: one `out` to THR per byte, no LSR polling
//! (each port access is a VM exit; ringvm and QEMU never drop THR writes).

use core::fmt;

const COM1_THR: u16 = 0x3f8;

/// Writes raw bytes to the serial console.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        crate::arch::outb(COM1_THR, b);
    }
}

/// `core::fmt` sink for the serial console.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Serial, format_args!($($arg)*));
    }};
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_bytes(b"\n") };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::serial::write_bytes(b"\n");
    }};
}
