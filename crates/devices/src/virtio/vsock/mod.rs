//! virtio-vsock (device id 19) with its host side on Unix sockets, in Firecracker's
//! hybrid-vsock convention.
//!
//! - [`packet`]: the packet header, and reading/writing packets from/to descriptor chains.
//! - [`connection`]: one stream's state and credit-based flow control.
//! - [`muxer`]: the Unix sockets: `PATH` for host-initiated streams (`CONNECT <port>\n` /
//!   `OK <port>\n`) and `PATH_<port>` for guest-initiated ones.
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) and its thread ([`Vsock`]).
//!
//! The guest is hostile: malformed, misaddressed or out-of-credit packets are dropped or
//! answered with RST; a broken ring sets `DEVICE_NEEDS_RESET`. Guest data is buffered at most
//! [`connection::CONN_BUF`] bytes per stream (the credit we advertise).

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

#[cfg(test)]
mod tests;

pub use device::{Vsock, VsockCounters};
