//! A TAP interface opened by name through `/dev/net/tun`, with the virtio-net header
//! (`virtio_net_hdr_v1`, 12 bytes) in front of every frame in both directions.
//!
//! `TUNSETIFF` creates the interface when it does not exist and the caller has
//! `CAP_NET_ADMIN`; it then lives as long as this fd (it is not made persistent).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `IFNAMSIZ` less the terminating NUL.
pub const MAX_NAME_LEN: usize = 15;
/// Size of `struct virtio_net_hdr_v1` (`virtio_net_hdr_mrg_rxbuf`).
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `TUNSETOFFLOAD` bits: what the reader of the TAP (we, for the guest) accepts.
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
}

/// Checks a TAP name as `TUNSETIFF` needs it (1 to 15 bytes, no `/`, whitespace or NUL).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "TAP name '{name}' must be 1 to {MAX_NAME_LEN} bytes long"
        ));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace() || b == b':')
        || name == "."
        || name == ".."
    {
        return Err(format!("TAP name '{name}' is not a valid interface name"));
    }
    Ok(())
}

/// The host end of the virtio-net device: a TAP fd, non-blocking, with vnet headers (or, for
/// tests, any datagram fd that keeps frame boundaries).
#[derive(Debug)]
pub struct Tap {
    file: File,
    is_tap: bool,
    name: String,
}

impl Tap {
    /// Opens (creating it with `CAP_NET_ADMIN` if needed) TAP interface `name`.
    pub fn open(name: &str) -> io::Result<Self> {
        check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        // struct ifreq: 16 bytes of name, then the union (ifr_flags, a short, first).
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes on x86_64) that `ifr`
        // provides; the fd is ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETVNETHDRSZ: {e}")));
        }
        let tap = Self {
            file,
            is_tap: true,
            name: name.to_owned(),
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// A stand-in for a TAP (tests): `fd` must keep frame boundaries (a datagram or seqpacket
    /// socket) and be non-blocking; frames carry the 12-byte header as on a TAP.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            file: File::from(fd),
            is_tap: false,
            name: "test".into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the TAP which offloads (`offload::*`) the guest accepts on frames we read.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        if !self.is_tap {
            return Ok(());
        }
        let arg = flags as libc::c_ulong;
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (header included); `WouldBlock` when there is none.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            is_tap: self.is_tap,
            name: self.name.clone(),
        })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("hptap0").is_ok());
        assert!(check_name("a23456789012345").is_ok());
        assert!(
            check_name("a234567890123456")
                .unwrap_err()
                .contains("1 to 15")
        );
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("..").is_err());
    }

    #[test]
    fn too_long_name_fails_before_any_ioctl() {
        let e = Tap::open("this-name-is-too-long").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
