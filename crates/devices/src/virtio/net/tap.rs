//! A TAP interface opened by name through `/dev/net/tun`, with the virtio-net header
//! (`virtio_net_hdr_v1`, 12 bytes) in front of every frame in both directions.
//!
//! `TUNSETIFF` creates the interface when it does not exist and the caller has
//! `CAP_NET_ADMIN`; it then lives as long as this fd (it is not made persistent).
//!
//! For several queue pairs the interface is opened once per pair with `IFF_MULTI_QUEUE`: each fd
//! is one queue, and the kernel spreads received flows over the attached ones. A queue the guest
//! does not use is detached ([`Tap::set_queue_enabled`]) so nothing is steered to it. One pair
//! opens without `IFF_MULTI_QUEUE`, as before, so existing single-queue TAPs still open (the
//! kernel refuses a flag mismatch with an existing interface).

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
/// `_IOR('T', 210, unsigned int)`: the interface name and flags of a TAP fd.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
/// The kernel's limit on queues per TAP (`MAX_TAP_QUEUES`).
pub const MAX_QUEUES: usize = 256;

/// `TUNSETOFFLOAD` bits: what the reader of the TAP (we, for the guest) accepts.
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
}

/// Makes the TAP carry the 12-byte `virtio_net_hdr_v1` in front of every frame.
fn set_vnet_hdr_len(file: &File) -> io::Result<()> {
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("TUNSETVNETHDRSZ: {e}")));
    }
    Ok(())
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
        Self::open_with(name, 0)
    }

    /// `queues` fds of TAP interface `name`: one plain fd for 1, else one `IFF_MULTI_QUEUE`
    /// queue each (all attached).
    pub fn open_queues(name: &str, queues: usize) -> io::Result<Vec<Self>> {
        if queues == 0 || queues > MAX_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a TAP has 1 to {MAX_QUEUES} queues, not {queues}"),
            ));
        }
        if queues == 1 {
            return Ok(vec![Self::open(name)?]);
        }
        (0..queues)
            .map(|_| Self::open_with(name, IFF_MULTI_QUEUE))
            .collect()
    }

    fn open_with(name: &str, extra_flags: libc::c_short) -> io::Result<Self> {
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
        let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra_flags;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes on x86_64) that `ifr`
        // provides; the fd is ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
        }
        set_vnet_hdr_len(&file)?;
        let tap = Self {
            file,
            is_tap: true,
            name: name.to_owned(),
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// A TAP queue opened by another process and passed to us (SCM_RIGHTS, as Kata Containers
    /// does): it must be a TAP with vnet headers (`IFF_TAP | IFF_VNET_HDR`, as `TUNSETIFF` set
    /// it); it is made non-blocking and gets our header size and offloads.
    pub fn from_tap_fd(fd: OwnedFd) -> io::Result<Self> {
        let file = File::from(fd);
        let mut ifr = [0u8; 40];
        // SAFETY: TUNGETIFF writes a struct ifreq (40 bytes on x86_64) into `ifr`; it fails
        // (ENOTTY/EBADFD) on anything but an attached TUN/TAP fd.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, ifr.as_mut_ptr()) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("not an attached TAP fd: {e}"),
            ));
        }
        let flags = libc::c_short::from_ne_bytes([ifr[16], ifr[17]]);
        if flags & IFF_TAP == 0 || flags & IFF_VNET_HDR == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a TUN/TAP fd with flags {flags:#x}: want IFF_TAP | IFF_VNET_HDR"),
            ));
        }
        let len = ifr[..16].iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&ifr[..len]).into_owned();
        // SAFETY: F_GETFL on a descriptor we own.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if fl < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_SETFL on a descriptor we own, adding O_NONBLOCK to its flags.
        let set = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
        if set < 0 {
            return Err(io::Error::last_os_error());
        }
        set_vnet_hdr_len(&file)?;
        let tap = Self {
            file,
            is_tap: true,
            name,
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

    /// Attaches (the kernel steers frames to it again) or detaches this queue of a multi-queue
    /// TAP. The kernel answers EINVAL when the queue already is in that state (and for a
    /// single-queue TAP, whose only queue is always attached): that is success here.
    pub fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        if !self.is_tap {
            return Ok(());
        }
        let mut ifr = [0u8; 40];
        let flags = if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETQUEUE reads a struct ifreq (40 bytes) that `ifr` provides; the fd is
        // ours.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, ifr.as_mut_ptr()) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
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
        let e = Tap::open_queues("hptap0", 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = Tap::open_queues("hptap0", MAX_QUEUES + 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    /// A frame leaving the host's side of the TAP: Ethernet, IPv4, UDP from `port` (so each
    /// one is a flow of its own for the kernel's queue selection).
    fn udp_frame(port: u16) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
        let ip_len = 20u16 + 8 + 4;
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f[16..18].copy_from_slice(&ip_len.to_be_bytes());
        f.extend_from_slice(&[10, 78, 0, 1, 10, 78, 0, 2]);
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&[0, 7, 0, 12, 0, 0]);
        f.extend_from_slice(b"ping");
        f
    }

    /// Sends 64 flows out of interface `index` and counts the frames each queue reads.
    fn spread(taps: &[Tap], index: libc::c_int) -> Vec<usize> {
        // SAFETY: a plain socket call; the fd is closed below.
        let sock = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(sock >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index;
        addr.sll_halen = 6;
        for port in 0..64u16 {
            let f = udp_frame(1000 + port * 7);
            // SAFETY: sends `f` (live) to the address above, of the size given.
            let n = unsafe {
                libc::sendto(
                    sock,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(n, f.len() as isize, "{}", io::Error::last_os_error());
        }
        // SAFETY: our socket, closed once.
        unsafe { libc::close(sock) };
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut buf = [0u8; 2048];
        taps.iter()
            .map(|t| {
                let mut n = 0;
                // Ours only: the kernel sends its own (IPv6 neighbour discovery) on link-up.
                while let Ok(len) = t.read_frame(&mut buf) {
                    let frame = &buf[VNET_HDR_LEN..len.max(VNET_HDR_LEN)];
                    if frame.len() > 23 && frame[12..14] == [0x08, 0x00] && frame[23] == 17 {
                        n += 1;
                    }
                }
                n
            })
            .collect()
    }

    /// As root, in a network namespace of this test thread's own: the kernel spreads flows over
    /// attached queues and sends nothing to a detached one.
    #[test]
    fn detached_queues_get_no_frames() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: needs root (a network namespace and a TAP)");
            return;
        }
        let result = std::thread::spawn(|| {
            // SAFETY: moves this thread only into a fresh network namespace; it ends with
            // the thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare: {}", io::Error::last_os_error()));
            }
            let taps = Tap::open_queues("hpmq0", 2).map_err(|e| e.to_string())?;
            let up = std::process::Command::new("ip")
                .args(["link", "set", "hpmq0", "up"])
                .status()
                .map_err(|e| format!("ip: {e}"))?;
            if !up.success() {
                return Err("ip link set hpmq0 up failed".into());
            }
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(c"hpmq0".as_ptr()) } as libc::c_int;
            taps[1]
                .set_queue_enabled(false)
                .map_err(|e| e.to_string())?;
            taps[1]
                .set_queue_enabled(false)
                .map_err(|e| e.to_string())?;
            let detached = spread(&taps, index);
            taps[1].set_queue_enabled(true).map_err(|e| e.to_string())?;
            let attached = spread(&taps, index);
            Ok((detached, attached))
        })
        .join()
        .unwrap();
        let (detached, attached) = match result {
            Ok(r) => r,
            Err(e) if e.contains("ip:") => return eprintln!("skipping: {e}"),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(detached, [64, 0], "queue 1 detached");
        assert_eq!(attached.iter().sum::<usize>(), 64);
        assert!(attached[1] > 0, "both queues attached: {attached:?}");
    }
}
