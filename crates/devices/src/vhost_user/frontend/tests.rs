//! The frontend against a recording backend (the `vhost` crate's backend side): the messages of
//! negotiation, activation and reset, the ring eventfds end to end, and a backend's death and
//! replacement with and without an in-flight record.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::*;
use vhost::vhost_user::{
    Backend, BackendListener, Error, GpuBackend, Listener, Result, VhostUserBackendReqHandlerMut,
    VhostUserProtocolFeatures,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::spec::PROTOCOL_FEATURES;
use super::{Kind, Spec, VhostUserDevice};
use crate::virtio::{ActivatedQueue, DeviceInterrupt, VirtioDevice, VirtioInterrupt, features};

const CAPACITY: u64 = 4096;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const INFLIGHT_SIZE: u64 = 4096;

/// What a backend saw: one line per message, and the fds it was given.
#[derive(Default)]
struct Seen {
    log: Vec<String>,
    kick: Option<File>,
    call: Option<File>,
    /// The accepted connection, to hang up on the frontend.
    socket: i32,
}

struct Recorder {
    seen: Arc<Mutex<Seen>>,
    protocol: u64,
}

impl Recorder {
    fn note(&self, line: String) {
        self.seen.lock().unwrap().log.push(line);
    }
}

fn unsupported<T>() -> Result<T> {
    Err(Error::InvalidOperation("not in this test"))
}

impl VhostUserBackendReqHandlerMut for Recorder {
    fn set_owner(&mut self) -> Result<()> {
        self.note("SET_OWNER".into());
        Ok(())
    }
    fn reset_owner(&mut self) -> Result<()> {
        unsupported()
    }
    fn reset_device(&mut self) -> Result<()> {
        self.note("RESET_DEVICE".into());
        Ok(())
    }
    fn get_features(&mut self) -> Result<u64> {
        Ok(features::VERSION_1 | features::RING_EVENT_IDX | PROTOCOL_FEATURES)
    }
    fn set_features(&mut self, f: u64) -> Result<()> {
        self.note(format!("SET_FEATURES {f:#x}"));
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let sizes: Vec<u64> = ctx.iter().map(|r| r.memory_size).collect();
        self.note(format!("SET_MEM_TABLE {sizes:?} fds={}", files.len()));
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        self.note(format!("SET_VRING_NUM {index} {num}"));
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        _descriptor: u64,
        _used: u64,
        _available: u64,
        _log: u64,
    ) -> Result<()> {
        self.note(format!("SET_VRING_ADDR {index}"));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.note(format!("SET_VRING_BASE {index} {base}"));
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.note(format!("GET_VRING_BASE {index}"));
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.note(format!("SET_VRING_KICK {index}"));
        self.seen.lock().unwrap().kick = fd;
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.note(format!("SET_VRING_CALL {index}"));
        self.seen.lock().unwrap().call = fd;
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> Result<()> {
        unsupported()
    }
    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::from_bits_truncate(self.protocol))
    }
    fn set_protocol_features(&mut self, f: u64) -> Result<()> {
        self.note(format!("SET_PROTOCOL_FEATURES {f:#x}"));
        Ok(())
    }
    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(2)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.note(format!("SET_VRING_ENABLE {index} {enable}"));
        Ok(())
    }
    fn get_config(&mut self, offset: u32, size: u32, _f: VhostUserConfigFlags) -> Result<Vec<u8>> {
        let mut cfg = vec![0u8; size as usize];
        if offset == 0 && size >= 8 {
            cfg[..8].copy_from_slice(&CAPACITY.to_le_bytes());
        }
        Ok(cfg)
    }
    fn set_config(&mut self, offset: u32, buf: &[u8], _f: VhostUserConfigFlags) -> Result<()> {
        self.note(format!("SET_CONFIG {offset} {buf:?}"));
        Ok(())
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> Result<()> {
        unsupported()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        unsupported()
    }
    fn get_inflight_fd(&mut self, ask: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        self.note(format!(
            "GET_INFLIGHT_FD {} {}",
            ask.num_queues, ask.queue_size
        ));
        let file = tempfile::tempfile().map_err(Error::ReqHandlerError)?;
        file.set_len(INFLIGHT_SIZE)
            .map_err(Error::ReqHandlerError)?;
        let info = VhostUserInflight::new(INFLIGHT_SIZE, 0, ask.num_queues, ask.queue_size);
        Ok((info, file))
    }
    fn set_inflight_fd(&mut self, info: &VhostUserInflight, _file: File) -> Result<()> {
        self.note(format!("SET_INFLIGHT_FD {}", info.mmap_size));
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> Result<u64> {
        unsupported()
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        unsupported()
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        unsupported()
    }
    fn check_device_state(&mut self) -> Result<()> {
        unsupported()
    }
    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        unsupported()
    }
}

/// Serves one connection on `path` in a thread until the frontend hangs up (or is hung up on).
fn serve(path: &Path, inflight: bool) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut protocol = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE;
    if inflight {
        protocol |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    let recorder = Recorder {
        seen: seen.clone(),
        protocol: protocol.bits(),
    };
    let mut listener = Listener::new(path, true).unwrap();
    let shared = seen.clone();
    std::thread::spawn(move || {
        let accepted = BackendListener::new(&mut listener, Arc::new(Mutex::new(recorder)))
            .unwrap()
            .accept();
        // Dropping the listener unlinks the socket file: do it now, not when this backend's
        // connection ends, or it could remove the socket of the replacement a test has bound
        // at the same path meanwhile (the frontend would then never reconnect).
        drop(listener);
        let Ok(Some(mut handler)) = accepted else {
            return;
        };
        shared.lock().unwrap().socket = handler.as_raw_fd();
        while handler.handle_request().is_ok() {}
    });
    seen
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The lines of `seen` from the first that starts with `from`.
fn log_from(seen: &Arc<Mutex<Seen>>, from: &str) -> Vec<String> {
    let log = seen.lock().unwrap().log.clone();
    let start = log
        .iter()
        .position(|l| l.starts_with(from))
        .unwrap_or(log.len());
    log[start..].to_vec()
}

#[derive(Default)]
struct Vectors(Mutex<Vec<u16>>);
impl VirtioInterrupt for Vectors {
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        self.0.lock().unwrap().push(vector);
        Ok(())
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    mem: GuestMemoryMmap,
    dev: VhostUserDevice,
    kick: EventFd,
    interrupt: DeviceInterrupt,
    vectors: Arc<Vectors>,
}

fn rig(inflight: bool) -> (Rig, Arc<Mutex<Seen>>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("backend.sock");
    let seen = serve(&socket, inflight);
    let dev = VhostUserDevice::connect(Spec {
        kind: Kind::Block,
        socket: socket.clone(),
        num_queues: 1,
        queue_size: 8,
    })
    .unwrap();
    let file = tempfile::tempfile().unwrap();
    file.set_len(1 << 16).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        1 << 16,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    let vectors = Arc::new(Vectors::default());
    let interrupt = DeviceInterrupt::new("test", 1, vectors.clone());
    interrupt.set_queue_vector(0, 1);
    let rig = Rig {
        _dir: dir,
        socket,
        mem,
        dev,
        kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        interrupt,
        vectors,
    };
    (rig, seen)
}

impl Rig {
    fn activate(&mut self) {
        let mut queue = Queue::new(8).unwrap();
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        let acked = features::VERSION_1 | features::RING_EVENT_IDX;
        self.dev
            .activate(
                GuestMemoryAtomic::new(self.mem.clone()),
                acked,
                vec![ActivatedQueue {
                    index: 0,
                    queue,
                    event: self.kick.try_clone().unwrap(),
                }],
                self.interrupt.clone(),
            )
            .unwrap();
    }
}

/// Hangs up on the frontend, as a dying backend's kernel does.
fn hang_up(seen: &Arc<Mutex<Seen>>) {
    let fd = seen.lock().unwrap().socket;
    // SAFETY: shutdown(2) on the test backend's connected socket, which its thread owns and
    // keeps open; no memory is involved.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

#[test]
fn negotiation_activation_and_reset_send_what_the_protocol_asks() {
    let (mut r, seen) = rig(true);
    assert_eq!(r.dev.device_type(), 2);
    let mut capacity = [0u8; 8];
    r.dev.read_config(0, &mut capacity);
    assert_eq!(
        u64::from_le_bytes(capacity),
        CAPACITY,
        "the backend's config space"
    );
    assert_eq!(r.dev.features() & PROTOCOL_FEATURES, 0, "never the guest's");

    r.activate();
    let want_features = features::VERSION_1 | features::RING_EVENT_IDX | PROTOCOL_FEATURES;
    assert_eq!(
        log_from(&seen, "GET_INFLIGHT_FD"),
        [
            "GET_INFLIGHT_FD 1 8".to_string(),
            format!("SET_FEATURES {want_features:#x}"),
            "SET_MEM_TABLE [65536] fds=1".into(),
            "SET_VRING_NUM 0 8".into(),
            "SET_VRING_ADDR 0".into(),
            "SET_VRING_BASE 0 0".into(),
            "SET_VRING_CALL 0".into(),
            "SET_VRING_KICK 0".into(),
            "SET_VRING_ENABLE 0 true".into(),
        ]
    );

    // The guest's notification (the queue's ioeventfd) is the backend's kick fd.
    r.kick.write(1).unwrap();
    let mut kick = seen.lock().unwrap().kick.take().unwrap();
    let mut n = [0u8; 8];
    kick.read_exact(&mut n).unwrap();
    assert_eq!(u64::from_ne_bytes(n), 1);
    // The backend's call reaches the guest on the queue's vector.
    let mut call = seen.lock().unwrap().call.take().unwrap();
    call.write_all(&1u64.to_ne_bytes()).unwrap();
    wait_for("the relayed interrupt", || {
        *r.vectors.0.lock().unwrap() == [1]
    });

    r.dev.write_config(32, &[1]);
    r.dev.reset();
    let log = log_from(&seen, "SET_CONFIG");
    assert_eq!(
        log,
        ["SET_CONFIG 32 [1]", "GET_VRING_BASE 0", "RESET_DEVICE"]
    );
}

#[test]
fn a_replacement_backend_gets_the_in_flight_record_and_the_used_index() {
    let (mut r, seen) = rig(true);
    r.activate();
    // Three requests completed before the backend died.
    r.mem.write_obj(3u16, GuestAddress(USED + 2)).unwrap();
    hang_up(&seen);
    wait_for("the hang-up", || r.interrupt.needs_reset());
    let next = serve(&r.socket, true);
    wait_for("the replacement's rings", || {
        log_from(&next, "SET_VRING_ENABLE").len() == 1
    });
    let log = log_from(&next, "SET_FEATURES");
    assert_eq!(log[1], "SET_MEM_TABLE [65536] fds=1");
    assert_eq!(
        log[2],
        format!("SET_INFLIGHT_FD {INFLIGHT_SIZE}"),
        "{log:?}"
    );
    assert!(log.contains(&"SET_VRING_BASE 0 3".to_string()), "{log:?}");
    let counters = r.dev.counters();
    assert_eq!(counters.reconnects.get(), 1);
    assert_eq!(counters.disconnects.get(), 1);
}

#[test]
fn without_an_in_flight_record_the_rings_wait_for_the_driver() {
    let (mut r, seen) = rig(false);
    r.activate();
    assert!(log_from(&seen, "GET_INFLIGHT_FD").is_empty());
    hang_up(&seen);
    wait_for("the hang-up", || r.interrupt.needs_reset());
    let next = serve(&r.socket, false);
    let counters = r.dev.counters();
    wait_for("the reconnection", || counters.reconnects.get() == 1);
    assert!(
        log_from(&next, "SET_FEATURES").is_empty(),
        "no rings for the new backend: {:?}",
        next.lock().unwrap().log
    );
    // The driver's reset and a new activation start the new backend afresh.
    r.dev.reset();
    r.activate();
    let log = log_from(&next, "SET_FEATURES");
    assert!(log.contains(&"SET_VRING_BASE 0 0".to_string()), "{log:?}");
    assert_eq!(
        log.last().map(String::as_str),
        Some("SET_VRING_ENABLE 0 true")
    );
}

#[test]
fn a_backend_that_is_gone_before_activation_is_reconnected_with_fresh_rings() {
    let (mut r, seen) = rig(false);
    hang_up(&seen);
    let counters = r.dev.counters();
    wait_for("the hang-up", || counters.disconnects.get() == 1);
    // The driver starts the device while no backend is there.
    r.activate();
    assert!(!r.interrupt.needs_reset(), "nothing was lost");
    let next = serve(&r.socket, false);
    wait_for("the fresh rings", || {
        !log_from(&next, "SET_VRING_ENABLE 0 true").is_empty()
    });
    let log = log_from(&next, "SET_FEATURES");
    assert!(log.contains(&"SET_VRING_BASE 0 0".to_string()), "{log:?}");
}

#[test]
fn a_network_card_has_our_mac_and_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let _seen = serve(&socket, false);
    let mac = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
    let dev = VhostUserDevice::connect(Spec {
        kind: Kind::Net { mac },
        socket,
        num_queues: 2,
        queue_size: 256,
    })
    .unwrap();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), [256, 256]);
    let mut cfg = [0u8; 10];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &mac, "ours, not the backend's");
    assert_eq!(&cfg[8..10], &1u16.to_le_bytes(), "one pair");
    assert_ne!(dev.features() & (1 << 5), 0, "VIRTIO_NET_F_MAC");

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let _seen = serve(&socket, false);
    let e = VhostUserDevice::connect(Spec {
        kind: Kind::Net { mac },
        socket,
        num_queues: 4,
        queue_size: 256,
    })
    .err()
    .unwrap();
    assert!(e.contains("serves 2 queues, num_queues=4"), "{e}");
}
