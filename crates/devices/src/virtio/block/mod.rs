//! virtio-blk (block device, id 2) on raw and qcow2 image files.
//!
//! - [`request`]: a request parsed out of a descriptor chain (header, data, status byte), with
//!   every guest-controlled field checked.
//! - [`backend`]: what the device needs from an image ([`DiskBackend`]); [`raw`]: raw files
//!   ([`RawFile`]), locked with `flock` so two VMs cannot write one image; [`qcow2`]: qcow2 images
//!   with backing chains ([`Qcow2File`], on the `imago` crate).
//! - [`counters`]: what the device did ([`BlockCounters`]), for the VMM's `vm.counters`.
//! - [`device`]: the virtio device ([`Block`]): features, configuration space, and the worker
//!   thread that serves every queue; [`server`]: what that thread does with a queue's requests.
//! - [`uring`]: raw images' IN/OUT/FLUSH on an io_uring per queue, with [`iovec`] pointing
//!   straight into guest memory.
//!
//! With io_uring ([`IoEngine::Uring`], the default) up to a queue's size of requests per queue
//! are in flight and the device thread never waits for the disk, so one slow request stalls
//! neither the other queues nor later requests. qcow2 images (whose `imago` driver is
//! synchronous), kernels that refuse io_uring, and [`IoEngine::Sync`] do synchronous I/O
//! (`pread`/`pwrite` through a bounce buffer) on the device thread: a slow disk then stalls this
//! device's queues, but never a vCPU.

pub mod backend;
pub mod counters;
pub mod device;
pub mod iovec;
pub mod qcow2;
pub mod raw;
pub mod request;
pub mod server;
pub mod uring;

#[cfg(test)]
mod tests;

pub use backend::DiskBackend;
pub use counters::BlockCounters;
pub use device::{Block, IoEngine, SERIAL_LEN, serial_for};
pub use qcow2::{Qcow2Error, Qcow2File};
pub use raw::{DiskError, RawFile};
pub use request::SECTOR_SIZE;

/// Feature bits (virtio 1.2 §5.2.3).
pub mod feature {
    use virtio_bindings::virtio_blk as b;
    pub const SIZE_MAX: u64 = 1 << b::VIRTIO_BLK_F_SIZE_MAX;
    pub const SEG_MAX: u64 = 1 << b::VIRTIO_BLK_F_SEG_MAX;
    pub const RO: u64 = 1 << b::VIRTIO_BLK_F_RO;
    pub const BLK_SIZE: u64 = 1 << b::VIRTIO_BLK_F_BLK_SIZE;
    pub const FLUSH: u64 = 1 << b::VIRTIO_BLK_F_FLUSH;
    pub const MQ: u64 = 1 << b::VIRTIO_BLK_F_MQ;
    pub const DISCARD: u64 = 1 << b::VIRTIO_BLK_F_DISCARD;
    pub const WRITE_ZEROES: u64 = 1 << b::VIRTIO_BLK_F_WRITE_ZEROES;
}

/// Request status byte values.
pub mod status {
    use virtio_bindings::virtio_blk as b;
    pub const OK: u8 = b::VIRTIO_BLK_S_OK as u8;
    pub const IOERR: u8 = b::VIRTIO_BLK_S_IOERR as u8;
    pub const UNSUPP: u8 = b::VIRTIO_BLK_S_UNSUPP as u8;
}
