//! The backend driven by the vhost crate's own frontend over a socket pair, with guest memory in
//! a memfd both sides map and a virtio-rng queue laid out by hand.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceBackend, Ended, SharedBackend, serve_connection};
use crate::virtio::Rng;

const MEM_SIZE: u64 = 1 << 20;
/// Where the "frontend" claims to have guest memory mapped (any value; only translated).
const VA: u64 = 0x7f00_0000_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUF: u64 = 0x8000;
const QSIZE: u16 = 8;

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vhost-user-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// The test's view of guest memory: the same memfd, mapped shared.
fn map(file: &File) -> GuestMemoryMmap {
    let region = MmapRegionBuilder::new(MEM_SIZE as usize)
        .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .unwrap();
    GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
        .unwrap()
}

struct Session {
    frontend: Frontend,
    server: JoinHandle<Ended>,
}

fn connect(backend: &SharedBackend) -> Session {
    let (a, b) = UnixStream::pair().unwrap();
    let be = backend.clone();
    let server = std::thread::spawn(move || serve_connection(b, &be));
    // A generous queue count so the frontend library sends out-of-range indexes for us.
    Session {
        frontend: Frontend::from_stream(a, 16),
        server,
    }
}

fn rng_backend() -> SharedBackend {
    Arc::new(Mutex::new(DeviceBackend::new("rng", Box::new(Rng::new()))))
}

/// Feature and protocol negotiation with REPLY_ACK, so refusals come back as NACKs.
fn negotiate(f: &mut Frontend) {
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    f.set_features(features).unwrap();
    let proto = f.get_protocol_features().unwrap();
    for p in [
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
    ] {
        assert!(proto.contains(p), "{p:?} offered");
    }
    f.set_protocol_features(proto).unwrap();
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
}

fn region(file: &File, size: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: VA,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }
}

fn ring_config(desc: u64) -> VringConfigData {
    VringConfigData {
        queue_max_size: 256,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: VA + desc,
        used_ring_addr: VA + USED,
        avail_ring_addr: VA + AVAIL,
        log_addr: None,
    }
}

struct Queue0 {
    kick: EventFd,
    call: EventFd,
    err: EventFd,
}

fn start_ring(f: &mut Frontend, file: &File) -> Queue0 {
    f.set_mem_table(&[region(file, MEM_SIZE)]).unwrap();
    f.set_vring_num(0, QSIZE).unwrap();
    f.set_vring_addr(0, &ring_config(DESC)).unwrap();
    f.set_vring_base(0, 0).unwrap();
    let q = Queue0 {
        kick: EventFd::new(0).unwrap(),
        call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        err: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    };
    f.set_vring_call(0, &q.call).unwrap();
    f.set_vring_err(0, &q.err).unwrap();
    f.set_vring_kick(0, &q.kick).unwrap();
    f.set_vring_enable(0, true).unwrap();
    q
}

/// Posts descriptor `i` (a 16-byte device-writable buffer at `addr`) as the `n`th request.
fn post(mem: &GuestMemoryMmap, i: u16, addr: u64, n: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&16u32.to_le_bytes());
    d[12..14].copy_from_slice(&(VRING_DESC_F_WRITE as u16).to_le_bytes());
    mem.write_slice(&d, GuestAddress(DESC + 16 * u64::from(i)))
        .unwrap();
    mem.write_obj(i, GuestAddress(AVAIL + 4 + 2 * u64::from((n - 1) % QSIZE)))
        .unwrap();
    // used_event (EVENT_IDX): interrupt me for this request.
    mem.write_obj(n - 1, GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)))
        .unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.write_obj(n, GuestAddress(AVAIL + 2)).unwrap();
}

fn wait(fd: &EventFd) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if fd.read().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

#[test]
fn rng_request_is_served_through_vhost_user() {
    let backend = rng_backend();
    let file = memfd(MEM_SIZE);
    let mem = map(&file);
    let Session {
        mut frontend,
        server,
    } = connect(&backend);
    negotiate(&mut frontend);
    let q = start_ring(&mut frontend, &file);

    post(&mem, 0, BUF, 1);
    q.kick.write(1).unwrap();
    assert!(wait(&q.call), "the call eventfd is written");
    assert_eq!(used_idx(&mem), 1);
    let id: u32 = mem.read_obj(GuestAddress(USED + 4)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(USED + 8)).unwrap();
    assert_eq!((id, len), (0, 16));
    let mut random = [0u8; 16];
    mem.read_slice(&mut random, GuestAddress(BUF)).unwrap();
    assert_ne!(random, [0u8; 16], "entropy written into the guest buffer");

    // A second request, then stopping the ring reports where the driver continues.
    post(&mem, 1, BUF + 64, 2);
    q.kick.write(1).unwrap();
    assert!(wait(&q.call));
    assert_eq!(frontend.get_vring_base(0).unwrap(), 2);
    // Stopped: a new request is not served.
    post(&mem, 2, BUF + 128, 3);
    q.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&mem), 2);
    // Restarted from that base, it is.
    frontend.set_vring_base(0, 2).unwrap();
    frontend.set_vring_call(0, &q.call).unwrap();
    frontend.set_vring_kick(0, &q.kick).unwrap();
    assert!(wait(&q.call), "pending request served after restart");
    assert_eq!(used_idx(&mem), 3);
    // Disabled, the ring is not served; enabled again, it is.
    frontend.set_vring_enable(0, false).unwrap();
    post(&mem, 3, BUF + 192, 4);
    q.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&mem), 3);
    frontend.set_vring_enable(0, true).unwrap();
    assert!(wait(&q.call), "served once enabled again");
    assert_eq!(used_idx(&mem), 4);
    assert!(q.err.read().is_err(), "no error signalled");
    assert_eq!(frontend.get_queue_num().unwrap(), 1);

    drop(frontend);
    assert!(matches!(server.join().unwrap(), Ended::Disconnected));
}

/// Sends one hostile request; it is refused (NACK or connection dropped) and the backend serves
/// the next connection normally.
fn refused(backend: &SharedBackend, file: &File, bad: impl FnOnce(&mut Frontend) -> bool) {
    let Session {
        mut frontend,
        server,
    } = connect(backend);
    negotiate(&mut frontend);
    assert!(bad(&mut frontend), "the hostile request failed");
    drop(frontend);
    let ended = server.join().unwrap();
    assert!(
        matches!(ended, Ended::Refused(_)),
        "the connection was dropped: {ended:?}"
    );
    let _ = file;
}

#[test]
fn hostile_requests_are_refused_and_the_next_session_works() {
    let backend = rng_backend();
    let file = memfd(MEM_SIZE);
    let small = memfd(MEM_SIZE / 2);

    refused(&backend, &file, |f| f.set_vring_num(5, 8).is_err());
    refused(&backend, &file, |f| f.set_vring_num(0, 3).is_err());
    refused(&backend, &file, |f| f.set_vring_num(0, 512).is_err());
    refused(&backend, &file, |f| {
        f.set_mem_table(&[region(&file, MEM_SIZE)]).unwrap();
        f.set_vring_addr(0, &ring_config(MEM_SIZE + DESC)).is_err()
    });
    // A region larger than its file: mapping it would fault on access.
    refused(&backend, &small, |f| {
        f.set_mem_table(&[region(&small, MEM_SIZE)]).is_err()
    });
    refused(&backend, &file, |f| {
        let mut r = region(&file, MEM_SIZE);
        r.mmap_offset = 4096;
        f.set_mem_table(&[r]).is_err()
    });
    refused(&backend, &file, |f| f.get_vring_base(9).is_err());
    refused(&backend, &file, |f| {
        f.set_config(0, VhostUserConfigFlags::WRITABLE, &[1; 4])
            .is_err()
    });
    // Rings whose addresses are in memory but too close to its end for the ring size.
    refused(&backend, &file, |f| {
        f.set_mem_table(&[region(&file, MEM_SIZE)]).unwrap();
        let mut c = ring_config(DESC);
        c.used_ring_addr = VA + MEM_SIZE - 8;
        f.set_vring_addr(0, &c).unwrap();
        f.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(0).unwrap();
        let err = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        f.set_vring_err(0, &err).unwrap();
        f.set_vring_kick(0, &kick).unwrap();
        f.set_vring_enable(0, true).unwrap();
        // The device does not start; the frontend hears of it on the error eventfd, then
        // leaves.
        wait(&err) && f.get_vring_base(0).is_ok() && f.set_vring_num(1, 8).is_err()
    });

    // After all that, a well-behaved frontend is served.
    let mem = map(&file);
    mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    let Session {
        mut frontend,
        server,
    } = connect(&backend);
    negotiate(&mut frontend);
    let q = start_ring(&mut frontend, &file);
    post(&mem, 0, BUF, 1);
    q.kick.write(1).unwrap();
    assert!(wait(&q.call));
    assert_eq!(used_idx(&mem), 1);
    drop(frontend);
    assert!(matches!(server.join().unwrap(), Ended::Disconnected));
}

#[test]
fn config_reads_are_bounded_and_zero_past_the_device() {
    let backend = rng_backend();
    let Session {
        mut frontend,
        server,
    } = connect(&backend);
    negotiate(&mut frontend);
    // virtio-rng has no config space: what a frontend asks for within the limit reads as zero.
    let (_, bytes) = frontend
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0xff; 8])
        .unwrap();
    assert_eq!(bytes, vec![0; 8]);
    drop(frontend);
    assert!(matches!(server.join().unwrap(), Ended::Disconnected));
}

#[test]
fn memory_regions_are_checked_added_and_removed() {
    use super::memory::{MemoryTable, RegionSpec};
    let spec = |gpa: u64, size: u64, user_addr: u64| RegionSpec {
        gpa,
        size,
        user_addr,
        offset: 0,
    };
    let mut t = MemoryTable::default();
    t.add(spec(0, MEM_SIZE, VA), memfd(MEM_SIZE)).unwrap();
    t.add(spec(1 << 30, MEM_SIZE, VA + (1 << 30)), memfd(MEM_SIZE))
        .unwrap();
    assert_eq!(t.va_to_gpa(VA + 0x10), Some(0x10));
    assert_eq!(t.va_to_gpa(VA + (1 << 30) + 8), Some((1 << 30) + 8));
    assert_eq!(t.va_to_gpa(VA + MEM_SIZE), None, "between the regions");
    // Guest ranges or frontend addresses that overlap what is there; a pipe (no known size).
    assert!(
        t.add(spec(0x1000, 0x1000, VA + (2 << 30)), memfd(MEM_SIZE))
            .is_err()
    );
    assert!(
        t.add(spec(2 << 30, 0x1000, VA + 0x1000), memfd(MEM_SIZE))
            .is_err()
    );
    let (r, _w) = {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created and are owned only here.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    };
    assert!(t.add(spec(2 << 30, 0x1000, VA + (2 << 30)), r).is_err());
    assert_eq!(t.len(), 2);
    assert!(t.remove(0, 0x1000).is_err(), "size must match");
    t.remove(0, MEM_SIZE).unwrap();
    assert_eq!(t.va_to_gpa(VA + 0x10), None);
    assert_eq!(t.len(), 1);
    let mem = t.guest_memory();
    assert!(mem.read_obj::<u8>(GuestAddress(1 << 30)).is_ok());
    assert!(mem.read_obj::<u8>(GuestAddress(0)).is_err());
}
