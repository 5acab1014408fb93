//! vhost-user: virtio devices whose queues are served by another process over a Unix socket.
//!
//! - [`frontend`]: the VMM's side, a [`crate::virtio::VirtioDevice`] whose rings a backend
//!   process serves from guest memory shared with it.

pub mod frontend;
