//! vhost-user: virtio devices split across processes over a Unix socket.
//!
//! - [`backend`]: serving one of our [`crate::virtio::VirtioDevice`]s to a vhost-user frontend
//!   (QEMU, or a Hyperpool VMM) from its own process.

pub mod backend;
