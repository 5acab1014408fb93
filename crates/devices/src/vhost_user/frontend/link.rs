//! One connection to a vhost-user backend: connecting and negotiating (SET_OWNER, features,
//! protocol features, queue count, configuration space), then starting and stopping the rings.
//! Every message goes through the `vhost` crate's [`Frontend`]; a socket timeout keeps a backend
//! that stops answering from hanging the vCPU that touched the device.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::spec::{PROTOCOL_FEATURES, Spec};
use crate::virtio::features;

/// How long one request may wait for the backend's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The protocol features this frontend uses when the backend has them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// The backend's record of the requests it has taken from the rings and not completed, in
/// memory it gave us: a backend that completes out of order (any real disk backend) can only
/// be restarted without losing or repeating requests if its successor reads this record
/// (`SET_INFLIGHT_FD`). The used index alone says how many completed, not which.
pub struct Inflight {
    info: VhostUserInflight,
    file: File,
}

/// A connected, negotiated backend.
pub struct Link {
    frontend: Frontend,
    /// The backend's virtio feature word (with [`PROTOCOL_FEATURES`] if it has it).
    pub backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    /// The backend's configuration space, if it serves one.
    pub config: Option<Vec<u8>>,
}

/// One ring as the driver configured it, and the eventfds that connect it.
pub struct Ring {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The queue's ioeventfd: guest notifications reach the backend without the VMM.
    pub kick: EventFd,
    /// Written by the backend when it used buffers; the relay turns it into the interrupt.
    pub call: EventFd,
}

impl Ring {
    /// Where the backend resumes after a reconnect: the used index in guest memory (requests it
    /// took but had not completed are served again).
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> Result<u16, String> {
        let addr = self
            .used
            .checked_add(2)
            .ok_or("used ring address overflows")?;
        mem.read_obj::<u16>(GuestAddress(addr))
            .map(u16::from_le)
            .map_err(|e| format!("queue {}: reading the used index: {e}", self.index))
    }
}

/// The regions of `mem` as SET_MEM_TABLE describes them (guest address, size, our mapping, and
/// the file and offset the backend maps). Memory that is not file-backed cannot be shared.
pub fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, String> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                format!(
                    "guest memory at {:#x} is not shared (a vhost-user device needs memory backed by a memfd)",
                    r.start_addr().0
                )
            })
        })
        .collect()
}

fn err(what: &str) -> impl Fn(vhost::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Link {
    /// Connects to the backend and negotiates; the error is one line.
    pub fn connect(spec: &Spec) -> Result<Self, String> {
        let path = spec.socket.display();
        let stream = UnixStream::connect(&spec.socket)
            .map_err(|e| format!("cannot connect to the vhost-user backend at {path}: {e}"))?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(|e| format!("vhost-user socket {path}: {e}"))?;
        Self::negotiate(
            Frontend::from_stream(stream, u64::from(spec.num_queues)),
            spec,
        )
        .map_err(|e| format!("vhost-user backend at {path}: {e}"))
    }

    fn negotiate(mut frontend: Frontend, spec: &Spec) -> Result<Self, String> {
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        if backend_features & features::VERSION_1 == 0 {
            return Err("the backend does not offer virtio 1.x (VIRTIO_F_VERSION_1)".into());
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if backend_features & PROTOCOL_FEATURES != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            tracing::debug!("vhost-user: backend protocol features {offered:?}");
            protocol = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(protocol)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = frontend.get_queue_num().map_err(err("GET_QUEUE_NUM"))?;
            if u64::from(spec.num_queues) > n {
                return Err(format!(
                    "the backend serves {n} queues, num_queues={} asks for more",
                    spec.num_queues
                ));
            }
        } else if spec.num_queues > spec.default_queues() {
            return Err(format!(
                "the backend does not announce its queue count (protocol feature MQ); num_queues={} needs it",
                spec.num_queues
            ));
        }
        let config = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let len = spec.config_len() as u32;
            let (_, payload) = frontend
                .get_config(
                    0,
                    len,
                    VhostUserConfigFlags::empty(),
                    &vec![0u8; len as usize],
                )
                .map_err(err("GET_CONFIG"))?;
            Some(payload)
        } else {
            None
        };
        Ok(Self {
            frontend,
            backend_features,
            protocol,
            config,
        })
    }

    /// The socket, watched for the backend's death (hang-up).
    pub fn socket_fd(&self) -> i32 {
        self.frontend.as_raw_fd()
    }

    pub fn has(&self, feature: VhostUserProtocolFeatures) -> bool {
        self.protocol.contains(feature)
    }

    /// A fresh in-flight record for `num_queues` rings of up to `queue_size`, if the backend
    /// keeps one.
    pub fn inflight(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<Inflight>, String> {
        if !self.has(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            return Ok(None);
        }
        let ask = VhostUserInflight::new(0, 0, num_queues, queue_size);
        let (info, file) = self
            .frontend
            .get_inflight_fd(&ask)
            .map_err(err("GET_INFLIGHT_FD"))?;
        // Received descriptors come without close-on-exec: a device process started later must
        // not inherit this one.
        // SAFETY: F_SETFD on the descriptor `file` owns.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Some(Inflight { info, file }))
    }

    /// Hands the backend everything it needs to serve `rings`: the driver's `acked` features,
    /// the memory table, the in-flight record a previous backend kept (`resume`), and each
    /// ring's size, addresses, base, call and kick eventfds; then enables them. `bases` are the
    /// rings' starting avail indices.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        acked: u64,
        queue_max: u16,
        rings: &[Ring],
        bases: &[u16],
        resume: Option<&Inflight>,
    ) -> Result<(), String> {
        let has_inflight = self.has(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let f = &mut self.frontend;
        f.set_features(Spec::backend_features(acked, self.backend_features))
            .map_err(err("SET_FEATURES"))?;
        f.set_mem_table(&memory_regions(mem)?)
            .map_err(err("SET_MEM_TABLE"))?;
        if let Some(r) = resume.filter(|_| has_inflight) {
            f.set_inflight_fd(&r.info, r.file.as_raw_fd())
                .map_err(err("SET_INFLIGHT_FD"))?;
        }
        for (ring, &base) in rings.iter().zip(bases) {
            let q = ring.index;
            let host = |gpa: u64, what: &str| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| format!("queue {q}: {what} at {gpa:#x}: {e}"))
            };
            let addrs = VringConfigData {
                queue_max_size: queue_max,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host(ring.desc, "descriptor table")?,
                used_ring_addr: host(ring.used, "used ring")?,
                avail_ring_addr: host(ring.avail, "available ring")?,
                log_addr: None,
            };
            f.set_vring_num(q, ring.size)
                .map_err(err("SET_VRING_NUM"))?;
            f.set_vring_addr(q, &addrs).map_err(err("SET_VRING_ADDR"))?;
            f.set_vring_base(q, base).map_err(err("SET_VRING_BASE"))?;
            f.set_vring_call(q, &ring.call)
                .map_err(err("SET_VRING_CALL"))?;
            f.set_vring_kick(q, &ring.kick)
                .map_err(err("SET_VRING_KICK"))?;
        }
        if self.backend_features & PROTOCOL_FEATURES != 0 {
            for ring in rings {
                f.set_vring_enable(ring.index, true)
                    .map_err(err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the rings (GET_VRING_BASE is the backend's "stop and tell me where you are"), then
    /// resets the device if the backend can, else disables the rings.
    pub fn stop(&mut self, rings: &[Ring]) -> Result<(), String> {
        let f = &mut self.frontend;
        for ring in rings {
            f.get_vring_base(ring.index)
                .map_err(err("GET_VRING_BASE"))?;
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            f.reset_device().map_err(err("RESET_DEVICE"))?;
        } else if self.backend_features & PROTOCOL_FEATURES != 0 {
            for ring in rings {
                f.set_vring_enable(ring.index, false)
                    .map_err(err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Writes the driver's configuration change through to the backend.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(err("SET_CONFIG"))
    }
}

impl Spec {
    /// Queues a device has without MQ: one request queue, or one RX/TX pair.
    fn default_queues(&self) -> u16 {
        match self.kind {
            super::spec::Kind::Block => 1,
            super::spec::Kind::Net { .. } => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    use super::*;

    fn memfd(len: u64) -> std::fs::File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn file_backed_regions_translate_to_memory_table_entries() {
        let file = memfd(3 << 16);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
            (
                GuestAddress(0),
                1 << 16,
                Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            ),
            (
                GuestAddress(1 << 20),
                2 << 16,
                Some(FileOffset::new(file.try_clone().unwrap(), 1 << 16)),
            ),
        ])
        .unwrap();
        let regions = memory_regions(&mem).unwrap();
        assert_eq!(regions.len(), 2);
        let r = &regions[1];
        assert_eq!(
            (r.guest_phys_addr, r.memory_size, r.mmap_offset),
            (1 << 20, 2 << 16, 1 << 16)
        );
        assert_eq!(
            r.userspace_addr,
            mem.get_host_address(GuestAddress(1 << 20)).unwrap() as u64
        );
        assert!(r.mmap_handle >= 0);
    }

    #[test]
    fn anonymous_memory_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 1 << 16)]).unwrap();
        let Err(e) = memory_regions(&mem) else {
            panic!("anonymous memory accepted");
        };
        assert!(e.contains("0x1000") && e.contains("not shared"), "{e}");
    }

    #[test]
    fn used_index_is_read_from_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        mem.write_obj(7u16.to_le(), GuestAddress(0x3002)).unwrap();
        let ring = Ring {
            index: 0,
            size: 8,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
        };
        assert_eq!(ring.used_idx(&mem).unwrap(), 7);
        let outside = Ring {
            used: 1 << 20,
            ..ring
        };
        assert!(outside.used_idx(&mem).is_err());
    }

    #[test]
    fn a_missing_socket_is_one_line() {
        let spec = Spec {
            kind: super::super::spec::Kind::Block,
            socket: "/nonexistent/hp-vhost.sock".into(),
            num_queues: 1,
            queue_size: 128,
        };
        let e = Link::connect(&spec).err().unwrap();
        assert!(e.contains("/nonexistent/hp-vhost.sock"), "{e}");
        assert!(!e.contains('\n'));
    }
}
