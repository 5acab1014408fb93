//! virtio-net (device id 1) on a host TAP interface.
//!
//! - [`tap`]: opening `/dev/net/tun` by name with vnet headers and offloads ([`Tap`]).
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) and its thread ([`Net`]).
//!
//! The guest is hostile: a malformed chain (outside guest memory, looping, wrong direction)
//! sets `DEVICE_NEEDS_RESET`; an unusable frame (too big, offloads not negotiated) is dropped.

pub mod device;
pub mod tap;

#[cfg(test)]
mod tests;

pub use device::Net;
pub use tap::Tap;
