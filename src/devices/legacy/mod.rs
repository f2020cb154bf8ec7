//! Legacy PC devices: 8250 serial, i8042 reset, isa-debug-exit, CMOS RTC, ACPI sleep
//! registers (power-off).

pub mod acpi_sleep;
pub mod cmos;
pub mod debug_exit;
pub mod i8042;
pub mod serial;

pub use acpi_sleep::AcpiSleep;
pub use cmos::Cmos;
pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use serial::Serial;
