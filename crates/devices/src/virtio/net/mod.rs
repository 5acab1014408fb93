//! virtio-net (device id 1) on a host TAP interface, one TAP queue per queue pair.
//!
//! - [`tap`]: opening `/dev/net/tun` by name with vnet headers, offloads and multiqueue
//!   ([`Tap`]).
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice), its features and configuration,
//!   activation ([`Net`]).
//! - [`pair`]: a queue pair's thread: TX to its TAP queue, RX from it (with `MRG_RXBUF`).
//! - [`ctrl`]: the control queue (`VQ_PAIRS_SET`) and which pairs are in use.
//!
//! The guest is hostile: a malformed chain (outside guest memory, looping, wrong direction)
//! sets `DEVICE_NEEDS_RESET`; an unusable frame (too big, offloads not negotiated) is dropped;
//! an unknown or out-of-range control command is answered `VIRTIO_NET_ERR`.

pub mod ctrl;
pub mod device;
pub mod pair;
pub mod tap;

#[cfg(test)]
mod tests;

pub use device::{Net, NetCounters};
pub use tap::Tap;
