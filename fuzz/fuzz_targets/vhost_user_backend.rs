//! The vhost-user backend fed arbitrary messages by its frontend: a virtio-rng behind the
//! adapter, set up by a well-behaved frontend first (features, a memfd memory table, ring 0 with
//! kick and call eventfds), then the input written raw on the socket as further messages —
//! ring sizes, addresses, bases, enables, configuration reads and writes, memory slot removals,
//! resets, garbage headers.
//!
//! Checked: nothing panics or hangs; the connection ends (the input runs out or is refused) and
//! the backend then takes a new frontend and answers it.

#![no_main]

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use hyperpool_devices::vhost_user::backend::{DeviceBackend, SharedBackend, serve_connection};
use hyperpool_devices::virtio::Rng;
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 1 << 16;
const VA: u64 = 0x7f00_0000_0000;

fn memfd() -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and nothing else owns it.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(MEM_SIZE).unwrap();
    f
}

/// A frontend connected to `backend` over a socket pair, served on a thread.
fn connect(backend: &SharedBackend) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (a, b) = UnixStream::pair().unwrap();
    let be = backend.clone();
    let server = std::thread::spawn(move || {
        serve_connection(b, &be);
    });
    (a, server)
}

fuzz_target!(|data: &[u8]| {
    let backend: SharedBackend = Arc::new(Mutex::new(DeviceBackend::new(
        "fuzz-rng",
        Box::new(Rng::new()),
    )));
    let (sock, server) = connect(&backend);
    let file = memfd();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    {
        let mut f = Frontend::from_stream(sock.try_clone().unwrap(), 4);
        f.set_owner().unwrap();
        let features = f.get_features().unwrap();
        f.set_features(features).unwrap();
        let proto = f.get_protocol_features().unwrap();
        f.set_protocol_features(proto).unwrap();
        f.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: VA,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .unwrap();
        f.set_vring_num(0, 8).unwrap();
        f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 256,
                queue_size: 8,
                flags: 0,
                desc_table_addr: VA + 0x1000,
                used_ring_addr: VA + 0x3000,
                avail_ring_addr: VA + 0x2000,
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_call(0, &call).unwrap();
        f.set_vring_kick(0, &kick).unwrap();
    }
    // Replies are drained so the backend never blocks on a full socket.
    let mut reader = sock.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut writer = sock.try_clone().unwrap();
    let _ = writer.write_all(data);
    let _ = kick.write(1);
    let _ = sock.shutdown(Shutdown::Write);
    server.join().expect("the connection ends without a panic");
    let _ = sock.shutdown(Shutdown::Both);
    drain.join().unwrap();

    // The backend reset the device and serves the next frontend.
    let (sock, server) = connect(&backend);
    let f = Frontend::from_stream(sock.try_clone().unwrap(), 4);
    assert_ne!(f.get_features().expect("answered"), 0);
    drop(f);
    let _ = sock.shutdown(Shutdown::Both);
    server.join().unwrap();
});
