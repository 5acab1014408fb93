//! Descriptor chains as the device models see them: [`collect_chain`] walks a chain into
//! [`Desc`]s, checking every buffer lies in guest memory, and [`ChainError`] is why a queue is
//! unusable until the driver resets the device. Used by vsock, net and console.

use std::fmt;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// One descriptor of a chain, as the device sees it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// The queue is unusable until the driver resets the device.
#[derive(Debug)]
pub enum ChainError {
    Ring(virtio_queue::Error),
    /// The avail index moved more than a queue's worth past what we consumed.
    AvailIndex {
        avail: u16,
        next: u16,
    },
    /// A chain that is empty, loops, or runs off its table.
    BadChain {
        head: u16,
    },
    /// A buffer outside guest memory.
    BadBuffer {
        addr: u64,
        len: u32,
    },
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ring(e) => write!(f, "ring access: {e}"),
            Self::AvailIndex { avail, next } => {
                write!(f, "avail index {avail} is too far from {next}")
            }
            Self::BadChain { head } => write!(
                f,
                "descriptor chain at {head} is empty, loops or is truncated"
            ),
            Self::BadBuffer { addr, len } => {
                write!(f, "buffer {addr:#x}+{len:#x} is outside guest memory")
            }
        }
    }
}

impl From<virtio_queue::Error> for ChainError {
    fn from(e: virtio_queue::Error) -> Self {
        Self::Ring(e)
    }
}

/// Collects a chain's descriptors, checking each lies in guest memory (for `perm` when it is
/// device-writable). A chain that stops before a descriptor without NEXT is broken.
pub fn collect_chain<M>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Desc>, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut out = Vec::new();
    let mut ends = false;
    for d in chain {
        ends = !d.has_next();
        let perm = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !GuestMemory::check_range(mem, d.addr(), d.len() as usize, perm) {
            return Err(ChainError::BadBuffer {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        out.push(Desc {
            addr: d.addr(),
            len: d.len(),
            write_only: d.is_write_only(),
        });
    }
    if out.is_empty() || !ends {
        return Err(ChainError::BadChain { head });
    }
    Ok(out)
}
