//! The VMM as a vhost-user frontend: a virtio device whose queues a separate backend process
//! serves from guest memory it maps (the guest's RAM must be a shared memfd for that).
//!
//! - [`spec`]: what the device is, and the pure decisions made from what the backend offers
//!   (features the guest sees, the configuration space it reads).
//! - [`link`]: one connection to the backend, its negotiation and the ring hand-over
//!   (`vhost` crate's `Frontend`), and guest memory as a vhost-user memory table.
//! - `relay`: an active device's thread, backend interrupts to the guest.
//! - `watch`: the device's socket watcher: the backend's death, and reconnection.
//! - [`device`]: [`VhostUserDevice`], the [`crate::virtio::VirtioDevice`] on top.

pub mod device;
pub mod link;
mod relay;
pub mod spec;
mod watch;

#[cfg(test)]
mod tests;

pub use device::{VhostUserCounters, VhostUserDevice};
pub use link::memory_regions;
pub use spec::{Kind, Spec};
