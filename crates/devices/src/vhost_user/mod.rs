//! vhost-user: virtio devices split across processes over a Unix socket.
//!
//! - [`frontend`]: the VMM's side, a [`crate::virtio::VirtioDevice`] whose rings a backend
//!   process serves from guest memory shared with it.
//! - [`backend`]: serving one of our [`crate::virtio::VirtioDevice`]s to a vhost-user frontend
//!   (QEMU, or a Hyperpool VMM) from its own process.

pub mod backend;
pub mod frontend;
