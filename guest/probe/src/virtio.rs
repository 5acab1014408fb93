//! virtio through the `virtio-drivers` crate: its `Hal` (DMA from a static, identity-mapped
//! pool; sharing is the identity) and the `rng` check.
//!
//! Everything polls (no interrupts) in ring 0 and stays small: one device bring-up and a
//! handful of 4 KiB requests.

use crate::pci::{self, Ecam};
use crate::{paging, println, time};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use virtio_drivers::device::common::Feature;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::bus::{
    CapabilityInfo, DeviceFunction, PCI_CAP_ID_VNDR, PciRoot,
};
use virtio_drivers::transport::pci::{PciTransport, VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_VENDOR_ID};
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

const PAGE: usize = 4096;
/// DMA pool pages (one bit each in `DMA_USED`).
const DMA_PAGES: usize = 64;

#[repr(C, align(4096))]
struct DmaPool([MaybeUninit<u8>; DMA_PAGES * PAGE]);

/// Not zeroed at boot: `dma_alloc` zeroes what it hands out.
#[unsafe(link_section = ".bss.noinit.dma")]
static mut DMA_POOL: DmaPool = DmaPool([MaybeUninit::uninit(); DMA_PAGES * PAGE]);
/// Bit i set: page i of the pool is allocated.
static DMA_USED: AtomicU64 = AtomicU64::new(0);

/// The probe's `Hal`: memory is identity mapped (phys == virt) and there is no IOMMU.
pub struct ProbeHal;

fn pool_base() -> u64 {
    (&raw mut DMA_POOL) as u64
}

// SAFETY: dma_alloc returns page-aligned, zeroed, exclusively owned pool pages (tracked in
// DMA_USED) whose physical address equals their virtual address; mmio_phys_to_virt returns
// the identity-mapped MMIO address; share/unshare are the identity (no bounce buffers).
unsafe impl Hal for ProbeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        if pages == 0 || pages > DMA_PAGES {
            return (0, NonNull::dangling());
        }
        let mask = if pages == 64 {
            u64::MAX
        } else {
            (1u64 << pages) - 1
        };
        let mut used = DMA_USED.load(Ordering::Acquire);
        loop {
            let Some(first) = (0..=DMA_PAGES - pages).find(|i| used & (mask << i) == 0) else {
                return (0, NonNull::dangling());
            };
            match DMA_USED.compare_exchange(
                used,
                used | (mask << first),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let addr = pool_base() + (first * PAGE) as u64;
                    // SAFETY: these pages were just reserved for this caller only and lie
                    // inside DMA_POOL.
                    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, pages * PAGE) };
                    let ptr = NonNull::new(addr as *mut u8).expect("DMA pool at address 0");
                    return (addr, ptr);
                }
                Err(now) => used = now,
            }
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        let base = pool_base();
        if paddr < base || pages == 0 || pages > DMA_PAGES {
            return -1;
        }
        let first = ((paddr - base) as usize) / PAGE;
        if first + pages > DMA_PAGES {
            return -1;
        }
        let mask = if pages == 64 {
            u64::MAX
        } else {
            ((1u64 << pages) - 1) << first
        };
        DMA_USED.fetch_and(!mask, Ordering::AcqRel);
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Addresses above the boot identity map go through paging's window; `Found::open`
        // rejects BARs the window cannot reach before the transport is created.
        let _ = paging::ensure_mapped(paddr);
        NonNull::new(paddr as *mut u8).expect("MMIO at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// How `Found::open` words an unassigned BAR (the `rng` check names its type and size).
#[derive(Clone, Copy)]
pub enum BarNote {
    /// `<df> bar<n> unassigned`
    Index,
    /// `<df> bar<n> (<kind> <size> bytes) unassigned`
    KindAndSize,
}

/// The virtio functions on bus 0 that a check drives, with the `PciRoot` to bring them up.
/// Shared by every virtio check (`blk`, `console`, `net`, `rng`, `vsock`).
pub struct Found {
    ecam: Ecam,
    root: PciRoot<Ecam>,
    /// Number of functions on bus 0 (matching or not), for "not found" messages.
    pub scanned: usize,
    /// The matching functions, in bus order.
    pub functions: Vec<pci::Function>,
}

/// Scans bus 0 (ECAM from the MCFG) and keeps the virtio functions (vendor 1af4) for which
/// `want` holds; `want` sees each virtio function once, in bus order.
pub fn find(
    rsdp: u64,
    mut want: impl FnMut(&PciRoot<Ecam>, &pci::Function) -> bool,
) -> Result<Found, String> {
    let ecam = pci::find_ecam(rsdp)?;
    let root = PciRoot::new(ecam);
    let all = pci::scan_bus(&ecam, 0);
    let scanned = all.len();
    let functions = all
        .into_iter()
        .filter(|f| f.vendor == VIRTIO_VENDOR_ID && want(&root, f))
        .collect();
    Ok(Found {
        ecam,
        root,
        scanned,
        functions,
    })
}

/// [`find`] for one modern device id.
pub fn find_id(rsdp: u64, device: u16) -> Result<Found, String> {
    find(rsdp, |_, f| f.device == device)
}

/// The single-device checks' bring-up: the first function with modern device id `device`
/// (`what` names it in the "not found" message), opened as in [`Found::open`].
pub fn open_first(
    rsdp: u64,
    device: u16,
    what: &str,
) -> Result<(DeviceFunction, PciTransport), String> {
    let mut found = find_id(rsdp, device)?;
    if found.functions.is_empty() {
        return Err(format!(
            "no virtio 1.x {what} ({VIRTIO_VENDOR_ID:04x}:{device:04x}) on bus 0 \
             ({} functions)",
            found.scanned
        ));
    }
    let df = found.functions[0].df;
    Ok((df, found.open(0, BarNote::Index)?))
}

impl Found {
    /// The ECAM window the functions were found through.
    pub fn ecam(&self) -> Ecam {
        self.ecam
    }

    /// A function's PCI capabilities (bounded, as a looping list is the device's bug).
    pub fn capabilities(&self, df: DeviceFunction) -> impl Iterator<Item = CapabilityInfo> + '_ {
        self.root.capabilities(df).take(pci::MAX_CAPS)
    }

    /// Brings up `functions[i]` to a `PciTransport`: its BARs must be assigned and reachable
    /// through the probe's page tables (nothing here assigns them), then memory/I/O decoding
    /// and bus mastering are enabled. The caller owns the device from there (and its reset).
    pub fn open(&mut self, i: usize, note: BarNote) -> Result<PciTransport, String> {
        let f = &self.functions[i];
        let df = f.df;
        for b in pci::bars(&mut self.root, f)? {
            if b.address() == 0 {
                return Err(match note {
                    BarNote::Index => format!("{df} bar{} unassigned", b.index),
                    BarNote::KindAndSize => format!(
                        "{df} bar{} ({} {:#x} bytes) unassigned",
                        b.index,
                        b.kind(),
                        b.size()
                    ),
                });
            }
            if b.kind() != "io" {
                let end = b.address() + b.size();
                let window_ok = b.address() >> 21 == (end - 1) >> 21 && end <= 512 << 30;
                if end > paging::MAPPED_LIMIT && !window_ok {
                    return Err(format!(
                        "{df} bar{} at {:#x} is beyond the probe's identity map",
                        b.index,
                        b.address()
                    ));
                }
            }
        }
        pci::enable(&mut self.root, df);
        PciTransport::new::<ProbeHal, _>(&mut self.root, df)
            .map_err(|e| format!("{df} transport: {e}"))
    }
}

/// Modern (virtio 1.x) virtio-rng PCI device id (0x1040 + 4).
const RNG_MODERN: u16 = 0x1044;
/// Transitional virtio-rng device id (used only if it also has the modern interface).
const RNG_LEGACY: u16 = 0x1005;
const RNG_BYTES: usize = 4096;
const RNG_QUEUE: u16 = 0;
const RNG_QUEUE_SIZE: usize = 4;
/// Each request must complete within this.
const REQUEST_TIMEOUT_US: u64 = 2_000_000;
/// Give up after this many requests (a device may return fewer bytes than asked).
const MAX_REQUESTS: usize = 64;
/// Fewer distinct byte values than this in 4 KiB means "not random".
const MIN_DISTINCT: usize = 64;

/// Whether the function has the virtio 1.x common-configuration capability.
fn has_modern_interface(root: &PciRoot<Ecam>, f: &pci::Function) -> bool {
    root.capabilities(f.df).take(pci::MAX_CAPS).any(|c| {
        c.id == PCI_CAP_ID_VNDR && (c.private_header >> 8) as u8 == VIRTIO_PCI_CAP_COMMON_CFG
    })
}

/// Resets the device (status 0) and waits, at most `timeout_us`, for it to read back 0.
/// Consumes the transport without running its `Drop`, which would spin forever on a device
/// that never completes the reset.
pub fn reset(mut transport: PciTransport, timeout_us: u64) -> Result<(), String> {
    transport.set_status(DeviceStatus::empty());
    let deadline = time::rdtsc() + time::ticks_for_us(timeout_us);
    let result = loop {
        let status = transport.get_status();
        if status.is_empty() {
            break Ok(());
        }
        if time::rdtsc() > deadline {
            break Err(format!("reset not completed (status {status:?})"));
        }
        core::hint::spin_loop();
    };
    core::mem::forget(transport);
    result
}

/// Brings up one virtio-rng device (`found.functions[i]`) and reads `RNG_BYTES` from it.
fn read_rng(found: &mut Found, i: usize) -> Result<Vec<u8>, String> {
    let df = found.functions[i].df;
    // Declared before the transport and queue so that on every return path the device is
    // reset (transport dropped) before the buffer it may write to is freed.
    let mut buf = vec![0u8; RNG_BYTES];
    let mut transport = found.open(i, BarNote::KindAndSize)?;
    let feat = transport.begin_init(Feature::VERSION_1);
    if !feat.contains(Feature::VERSION_1) {
        return Err(format!("{df} does not offer VIRTIO_F_VERSION_1"));
    }
    if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
        return Err(format!("{df} did not accept FEATURES_OK"));
    }
    let mut queue =
        VirtQueue::<ProbeHal, RNG_QUEUE_SIZE>::new(&mut transport, RNG_QUEUE, false, false)
            .map_err(|e| format!("{df} queue 0: {e}"))?;
    transport.finish_init();

    let mut filled = 0;
    let mut requests = 0;
    while filled < RNG_BYTES {
        if requests == MAX_REQUESTS {
            return Err(format!(
                "{df} returned only {filled} bytes in {requests} requests"
            ));
        }
        requests += 1;
        let mut outs = [&mut buf[filled..]];
        // SAFETY: `outs` stays borrowed until pop_used below; on early returns the device is
        // reset (transport dropped) before `buf` is freed.
        let token = unsafe { queue.add(&[], &mut outs) }.map_err(|e| format!("{df} add: {e}"))?;
        if queue.should_notify() {
            transport.notify(RNG_QUEUE);
        }
        let deadline = time::rdtsc() + time::ticks_for_us(REQUEST_TIMEOUT_US);
        while !queue.can_pop() {
            if time::rdtsc() > deadline {
                let status = transport.get_status();
                let reset = reset(transport, REQUEST_TIMEOUT_US); // before `buf` can be freed
                return Err(format!(
                    "{df} request {requests} not completed within {} ms (status {status:?}){}",
                    REQUEST_TIMEOUT_US / 1000,
                    reset.err().map(|e| format!(", {e}")).unwrap_or_default()
                ));
            }
            core::hint::spin_loop();
        }
        // SAFETY: same buffers as passed to `add` for this token.
        let n = unsafe { queue.pop_used(token, &[], &mut outs) }
            .map_err(|e| format!("{df} pop: {e}"))?;
        filled += (n as usize).min(RNG_BYTES - filled);
    }
    let status = transport.get_status();
    if status.contains(DeviceStatus::DEVICE_NEEDS_RESET) || status.contains(DeviceStatus::FAILED) {
        return Err(format!("{df} status {status:?} after reading"));
    }
    // Reset the device before the queue's DMA memory is freed.
    reset(transport, REQUEST_TIMEOUT_US).map_err(|e| format!("{df} {e}"))?;
    drop(queue);
    Ok(buf)
}

/// The `rng` check: every modern virtio-rng on bus 0 returns 4 KiB that is not constant.
pub fn rng_check(rsdp: u64) -> Result<String, String> {
    // Transitional devices (1005) are driven through their modern interface when they have
    // one (QEMU's default on a PCIe root bus); legacy-only ones are skipped.
    let mut legacy = 0;
    let mut found = find(rsdp, |root, f| match f.device {
        RNG_MODERN => true,
        RNG_LEGACY if has_modern_interface(root, f) => true,
        RNG_LEGACY => {
            legacy += 1;
            false
        }
        _ => false,
    })?;
    if found.functions.is_empty() {
        return Err(format!(
            "no virtio 1.x rng ({VIRTIO_VENDOR_ID:04x}:{RNG_MODERN:04x}) on bus 0 \
             ({} functions, {legacy} legacy-only {VIRTIO_VENDOR_ID:04x}:{RNG_LEGACY:04x} skipped)",
            found.scanned
        ));
    }
    let mut min_distinct = usize::MAX;
    let mut per_device = Vec::new();
    for i in 0..found.functions.len() {
        let bytes = read_rng(&mut found, i)?;
        let f = &found.functions[i];
        let mut seen = [false; 256];
        for &b in &bytes {
            seen[b as usize] = true;
        }
        let distinct = seen.iter().filter(|&&s| s).count();
        println!(
            "rng: {} bytes={} distinct={distinct} first={:02x?}",
            f.df,
            bytes.len(),
            &bytes[..8]
        );
        if distinct < MIN_DISTINCT {
            return Err(format!(
                "{}: only {distinct} distinct byte values in {} bytes",
                f.df,
                bytes.len()
            ));
        }
        min_distinct = min_distinct.min(distinct);
        per_device.push(format!("{}", f.df));
    }
    let mut out = format!("bytes={RNG_BYTES} distinct={min_distinct}");
    if found.functions.len() > 1 {
        out.push_str(&format!(" devices={}", per_device.join(",")));
    }
    if legacy > 0 {
        out.push_str(&format!(" legacy_skipped={legacy}"));
    }
    Ok(out)
}
