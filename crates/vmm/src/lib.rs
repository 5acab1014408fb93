//! The Hyperpool VMM core: one KVM virtual machine, its memory, vCPUs, boot and platform devices.
//!
//! [`config::VmConfig`] says what to build; [`run::run`] builds it, runs it until the guest or the
//! host ends it, and reports why.

pub mod arch;
pub mod config;
mod console_socket;
pub mod control;
mod counters;
pub mod device_processes;
mod disk;
mod emulate;
pub mod error;
pub mod host;
pub mod hotplug;
pub mod machine;
mod memfd;
mod net;
mod pause;
pub mod pci;
pub mod run;
pub mod running;
pub mod serial_io;
pub mod vcpu;
mod vhost_user;

pub use config::VmConfig;
pub use disk::open_image;
pub use error::Error;
pub use net::open_tap;
pub use run::{Outcome, run};
