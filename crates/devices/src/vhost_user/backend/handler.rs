//! The vhost-user request handler over any [`VirtioDevice`]: the frontend's messages become the
//! same calls a virtio-pci transport makes (features, config space, `activate` with queues,
//! `reset`), so every device model serves out of process through this one code path.
//!
//! The device owns its queues on its own thread once activated, so ring state the frontend asks
//! for (GET_VRING_BASE) is read back from guest memory after the device stopped: our devices
//! complete (or give back) every chain they take before `reset` returns, so the used ring's
//! index is where the driver continues. Whenever the set of running rings changes, the device
//! is reset and activated again with all of them.
//!
//! What a reset loses is what it loses in-process too: a disk completes its requests in flight
//! first; net drops an RX frame that was waiting for buffers (chains it took are handed back
//! or published, never held); vsock resets its connections.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::memory::{MAX_REGIONS, MemoryTable, RegionSpec};
use super::notify::{CallSink, RingFds, SharedRingFds};
use super::ring::{Ring, RingAddrs};
use crate::virtio::{ActivateError, DeviceInterrupt, GuestMemoryHandle, VirtioDevice, features};

/// The largest device configuration space a frontend may read (virtio-pci gives it 4 KiB; QEMU
/// asks for the size of its own struct, which may exceed what our device defines: the rest
/// reads as zero, as on virtio-pci).
const MAX_CONFIG_SIZE: u32 = 256;

/// Protocol features we implement.
fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// A [`VirtioDevice`] served to one vhost-user frontend at a time.
pub struct DeviceBackend {
    device: Box<dyn VirtioDevice>,
    name: String,
    mem: GuestMemoryHandle,
    table: MemoryTable,
    rings: Vec<Ring>,
    fds: SharedRingFds,
    acked_features: u64,
    owned: bool,
    /// The rings the device currently runs (in index order); empty while it is stopped.
    running: Vec<usize>,
}

fn invalid(why: impl Into<String>) -> Error {
    Error::ReqHandlerError(std::io::Error::other(why.into()))
}

impl DeviceBackend {
    pub fn new(name: &str, device: Box<dyn VirtioDevice>) -> Self {
        let rings: Vec<Ring> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Ring::new(max))
            .collect();
        let fds = RingFds::new(rings.len());
        Self {
            device,
            name: name.to_owned(),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            table: MemoryTable::default(),
            rings,
            fds,
            acked_features: 0,
            owned: false,
            running: Vec::new(),
        }
    }

    /// The frontend went away (or asked for a reset): stop the device and forget everything it
    /// set up, ready for the next connection.
    pub fn disconnect(&mut self) {
        self.device.reset();
        self.running.clear();
        for r in &mut self.rings {
            *r = Ring::new(r.max_size);
        }
        self.fds.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.table = MemoryTable::default();
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(GuestMemoryMmap::new());
        self.acked_features = 0;
        self.owned = false;
    }

    /// The process is going: stop the device and drop it, so that what it holds is written out
    /// and closed (a qcow2 image's cached tables, its lock). Later frontends find no queues.
    pub fn close(&mut self) {
        self.disconnect();
        let device_type = self.device.device_type();
        drop(std::mem::replace(
            &mut self.device,
            Box::new(Closed { device_type }),
        ));
        self.rings.clear();
    }

    fn ring(&mut self, index: u32) -> Result<&mut Ring> {
        self.rings
            .get_mut(index as usize)
            .ok_or_else(|| invalid(format!("ring {index} does not exist")))
    }

    /// Stops the device; each ring it ran continues from the used index in guest memory.
    fn stop(&mut self) {
        if self.running.is_empty() {
            return;
        }
        self.device.reset();
        let mem = self.mem.memory();
        for &i in &self.running {
            if let Some(idx) = self.rings[i].used_idx(&mem) {
                self.rings[i].base = idx;
            }
        }
        self.running.clear();
    }

    /// Brings the device in line with the rings that are ready: restarted when that set changed.
    fn refresh(&mut self) {
        let ready: Vec<usize> = (0..self.rings.len())
            .filter(|&i| self.rings[i].ready())
            .collect();
        if ready == self.running {
            return;
        }
        self.stop();
        if ready.is_empty() {
            return;
        }
        let event_idx = self.acked_features & features::RING_EVENT_IDX != 0;
        let mem = self.mem.memory();
        let mut queues = Vec::with_capacity(ready.len());
        for &i in &ready {
            match self.rings[i].activated(i, &mem, event_idx) {
                Ok(q) => queues.push(q),
                Err(why) => {
                    self.broken(&format!("ring {i}: {why}"));
                    return;
                }
            }
        }
        drop(mem);
        let sink = Arc::new(CallSink::new(self.fds.clone(), self.rings.len() as u16));
        let interrupt =
            DeviceInterrupt::with_isr(&self.name, self.rings.len(), sink, Default::default());
        interrupt.set_config_vector(self.rings.len() as u16);
        for i in 0..self.rings.len() {
            interrupt.set_queue_vector(i, i as u16);
        }
        let virtio_features =
            self.acked_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        match self
            .device
            .activate(self.mem.clone(), virtio_features, queues, interrupt)
        {
            Ok(()) => {
                tracing::debug!("{}: running rings {ready:?}", self.name);
                self.running = ready;
            }
            // Not all the rings this device needs are there yet (net: RX and TX): wait.
            Err(ActivateError::QueueCount { expected, got }) => {
                self.device.reset();
                tracing::debug!("{}: {got} of {expected} rings ready", self.name);
            }
            Err(e) => {
                self.device.reset();
                self.broken(&format!("activation failed: {e}"));
            }
        }
    }

    /// Tells the frontend the device cannot go on (the rings' error eventfds).
    fn broken(&self, why: &str) {
        tracing::warn!("{}: {why}", self.name);
        let fds = self.fds.read().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = fds.signal_err() {
            tracing::warn!("{}: error eventfd: {e}", self.name);
        }
    }

    fn set_memory(&mut self) {
        let m = self.table.guest_memory();
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(m);
    }
}

/// The frontend's descriptor as an eventfd, made non-blocking first: a frontend that passes a
/// pipe, or an eventfd whose counter it keeps full, must not block a device thread's signal
/// (nor, behind it, a reset holding the backend's lock).
fn eventfd(file: Option<File>) -> Option<EventFd> {
    file.map(|f| {
        let fd = f.into_raw_fd();
        // SAFETY: fcntl on the descriptor we own; failure leaves its flags as they were.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        // SAFETY: the frontend passed us this descriptor and `file` owned it; the EventFd takes
        // over that ownership. A descriptor that is not an eventfd only makes reads/writes fail.
        unsafe { EventFd::from_raw_fd(fd) }
    })
}

fn spec(r: &VhostUserMemoryRegion) -> RegionSpec {
    RegionSpec {
        gpa: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        offset: r.mmap_offset,
    }
}

fn unsupported<T>(what: &'static str) -> Result<T> {
    Err(Error::InvalidOperation(what))
}

impl VhostUserBackendReqHandlerMut for DeviceBackend {
    fn set_owner(&mut self) -> Result<()> {
        if self.owned {
            return Err(Error::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.stop();
        for r in &mut self.rings {
            *r = Ring::new(r.max_size);
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let offered = self.get_features()?;
        if features & !offered != 0 {
            return Err(invalid(format!(
                "features {:#x} were not offered",
                features & !offered
            )));
        }
        tracing::debug!("{}: features {features:#x}", self.name);
        if features != self.acked_features {
            // Ring features (EVENT_IDX) are fixed while the device runs.
            self.stop();
        }
        self.acked_features = features;
        self.refresh();
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let specs: Vec<RegionSpec> = ctx.iter().map(spec).collect();
        self.table
            .replace(&specs, files)
            .map_err(|e| invalid(e.to_string()))?;
        self.set_memory();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let r = self.ring(index)?;
        if num == 0 || num > u32::from(r.max_size) || !num.is_power_of_two() {
            return Err(invalid(format!(
                "ring {index}: size {num} is not a power of two <= {}",
                r.max_size
            )));
        }
        r.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            return unsupported("dirty logging");
        }
        self.ring(index)?;
        let gpa = |va: u64, what: &str| {
            self.table.va_to_gpa(va).ok_or_else(|| {
                invalid(format!(
                    "ring {index}: {what} {va:#x} is not in guest memory"
                ))
            })
        };
        let addrs = RingAddrs {
            desc: gpa(descriptor, "descriptor table")?,
            avail: gpa(available, "available ring")?,
            used: gpa(used, "used ring")?,
        };
        if self.running.contains(&(index as usize)) {
            // New addresses for a running ring: the device restarts on them.
            self.stop();
        }
        self.ring(index)?.addrs = Some(addrs);
        self.refresh();
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let base =
            u16::try_from(base).map_err(|_| invalid(format!("ring {index}: base {base}")))?;
        self.ring(index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.ring(index)?;
        let i = index as usize;
        if self.running.contains(&i) {
            self.stop();
        }
        let r = &mut self.rings[i];
        r.kick = None;
        let base = r.base;
        self.refresh();
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let Some(fd) = eventfd(fd) else {
            return unsupported("polled rings (no kick eventfd)");
        };
        self.ring(u32::from(index))?.kick = Some(fd);
        self.refresh();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.ring(u32::from(index))?;
        self.fds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_call(usize::from(index), eventfd(fd));
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.ring(u32::from(index))?;
        self.fds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_err(usize::from(index), eventfd(fd));
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, _features: u64) -> Result<()> {
        // The vhost crate keeps what was acked and enforces it per request; nothing here
        // depends on it.
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.rings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.ring(index)?.enabled = enable;
        self.refresh();
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let end = offset
            .checked_add(size)
            .filter(|&e| e <= MAX_CONFIG_SIZE)
            .ok_or_else(|| invalid(format!("config {offset}+{size} is out of range")))?;
        let mut buf = vec![0u8; size as usize];
        let limit = self.device.config_size().min(end as usize);
        if (offset as usize) < limit {
            let n = limit - offset as usize;
            self.device.read_config(u64::from(offset), &mut buf[..n]);
        }
        Ok(buf)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        (offset as usize)
            .checked_add(buf.len())
            .filter(|&e| e <= self.device.config_size())
            .ok_or_else(|| invalid(format!("config {offset}+{} is out of range", buf.len())))?;
        self.device.write_config(u64::from(offset), buf);
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        unsupported("GPU socket")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        unsupported("shared objects")
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        unsupported("inflight tracking")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        unsupported("inflight tracking")
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        self.table
            .add(spec(region), fd)
            .map_err(|e| invalid(e.to_string()))?;
        self.set_memory();
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        self.table
            .remove(region.guest_phys_addr, region.memory_size)
            .map_err(|e| invalid(e.to_string()))?;
        self.set_memory();
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        unsupported("device state transfer")
    }

    fn check_device_state(&mut self) -> Result<()> {
        unsupported("device state transfer")
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        unsupported("shared memory regions")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        unsupported("dirty logging")
    }
}

/// What a [`DeviceBackend`] serves after [`DeviceBackend::close`]: no queues, never starts.
struct Closed {
    device_type: u32,
}

impl VirtioDevice for Closed {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[]
    }

    fn features(&self) -> u64 {
        0
    }

    fn activate(
        &mut self,
        _mem: GuestMemoryHandle,
        _features: u64,
        _queues: Vec<crate::virtio::ActivatedQueue>,
        _interrupt: DeviceInterrupt,
    ) -> std::result::Result<(), ActivateError> {
        Err(ActivateError::Other("the device was closed".into()))
    }

    fn reset(&mut self) {}
}
