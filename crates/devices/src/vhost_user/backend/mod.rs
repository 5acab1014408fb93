//! A virtio device model served to a vhost-user frontend from its own process.
//!
//! - [`handler`]: the vhost-user requests mapped onto [`crate::virtio::VirtioDevice`]
//!   ([`DeviceBackend`]), one code path for every device.
//! - [`memory`]: the frontend's memory regions, mapped from the descriptors it passes.
//! - [`ring`]: one vring's configuration and the queue the device gets from it.
//! - [`notify`]: interrupts as writes to the frontend's call (and error) eventfds.
//! - [`server`]: one frontend at a time on a Unix socket, the device reset between them.
//!
//! The frontend is as untrusted as a guest: indexes, addresses, sizes and descriptors it sends
//! are checked; a refused request drops the connection, never the process.

pub mod handler;
pub mod memory;
pub mod notify;
pub mod ring;
pub mod server;

#[cfg(test)]
mod tests;

pub use handler::DeviceBackend;
pub use server::{Ended, SharedBackend, serve, serve_connection};
