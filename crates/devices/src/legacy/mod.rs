//! PC legacy devices at their conventional I/O ports.

pub mod acpi_pm;
pub mod boot_timer;
pub mod cmos;
pub mod debug_exit;
pub mod ged;
pub mod i8042;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use boot_timer::BootTimer;
pub use cmos::Cmos;
pub use debug_exit::DebugExit;
pub use ged::Ged;
pub use i8042::I8042;
pub use serial::{Serial, SerialInput};
