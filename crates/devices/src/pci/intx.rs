//! INTx: a function's level-triggered interrupt pin, for drivers that do not enable MSI-X.
//!
//! A pin is an irqfd registered with KVM together with a resample fd (`KVM_IRQFD_FLAG_RESAMPLE`)
//! on the IOAPIC GSI the DSDT's `_PRT` gives the slot ([`super::intx_gsi`]). That is how KVM
//! models a level-triggered line fed by userspace:
//!
//! 1. the device's interrupt condition becomes true (virtio: ISR non-zero) → [`IntxPin::assert`]
//!    writes the irqfd and KVM raises the line;
//! 2. the guest's handler acknowledges the device (virtio: reads the ISR, which clears it) and
//!    EOIs the IOAPIC vector → KVM lowers the line and signals the resample fd;
//! 3. the [`IntxResampler`] thread wakes and calls [`IntxPin::resampled`]: if the condition still
//!    holds (the device had more to say), the line goes up again.
//!
//! So the line stays up exactly while the condition holds, as a wire would, without a vCPU exit
//! to us on EOI. Pins of slots sharing a GSI share KVM's resampler: an EOI signals all of them and
//! each re-asserts only if its own condition holds (a wired OR).
//!
//! The `_PRT` names GSIs directly (no interrupt link devices), which ACPI defines as
//! level-triggered, active-low, and the MADT overrides none of them (its only override is ISA
//! IRQ 0). KVM's IOAPIC ignores the polarity bit the guest programs: the level we drive is the
//! logical one, 1 = asserted.
//!
//! The PCI rules for when a function may drive INTx: not while the command register's Interrupt
//! Disable bit is set, and not while MSI-X is enabled. The segment tracks both
//! ([`IntxPin::set_masked`]); a masked pin whose condition holds is raised when it is unmasked.
//! Masking cannot pull an already raised line down (KVM only lowers it on EOI): the guest then
//! sees one interrupt, finds nothing pending after the next EOI, and the line stays low.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The device's interrupt condition: the state of its INTx line if nothing masked it.
pub trait IntxLevel: Send + Sync {
    fn asserted(&self) -> bool;
}

/// One INTx pin: the condition it follows, whether PCI rules mask it, and the two eventfds KVM
/// knows it by.
pub struct IntxPin {
    level: Arc<dyn IntxLevel>,
    masked: AtomicBool,
    trigger: EventFd,
    resample: EventFd,
}

impl IntxPin {
    pub fn new(level: Arc<dyn IntxLevel>) -> io::Result<Self> {
        Ok(Self {
            level,
            masked: AtomicBool::new(false),
            trigger: EventFd::new(libc::EFD_NONBLOCK)?,
            resample: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register with KVM as the irqfd of the pin's GSI.
    pub fn trigger_fd(&self) -> &EventFd {
        &self.trigger
    }

    /// The eventfd KVM signals when it lowers the line after an EOI.
    pub fn resample_fd(&self) -> &EventFd {
        &self.resample
    }

    /// The device's condition, masked or not (the PCI status register's Interrupt Status bit).
    pub fn pending(&self) -> bool {
        self.level.asserted()
    }

    /// Raises the line if the condition holds and nothing masks the pin. Called by the device
    /// after it set its condition.
    pub fn assert(&self) -> io::Result<()> {
        if !self.masked.load(Ordering::SeqCst) && self.level.asserted() {
            self.trigger.write(1)?;
        }
        Ok(())
    }

    /// Interrupt Disable set, or MSI-X enabled: the function must not drive INTx. Unmasking
    /// raises the line if the condition holds.
    pub fn set_masked(&self, masked: bool) {
        let was = self.masked.swap(masked, Ordering::SeqCst);
        if was && !masked {
            if let Err(e) = self.assert() {
                tracing::warn!("INTx: raising the line on unmask: {e}");
            }
        }
    }

    pub fn masked(&self) -> bool {
        self.masked.load(Ordering::SeqCst)
    }

    /// KVM lowered the line (the guest EOI'd it): raise it again if the condition still holds.
    pub fn resampled(&self) -> io::Result<()> {
        // Drain first: a resample signalled while we look is then seen on the next wake-up.
        let _ = self.resample.read();
        self.assert()
    }
}

/// The VMM side: registers a pin with KVM (irqfd with resample fd on `gsi`) and serves its
/// resamples ([`IntxResampler`]).
pub trait IntxRouting: Send + Sync {
    fn connect(&self, gsi: u32, pin: Arc<IntxPin>) -> io::Result<()>;
    /// Undoes [`IntxRouting::connect`] for a device being unplugged.
    fn disconnect(&self, gsi: u32, pin: &Arc<IntxPin>) -> io::Result<()>;
}

/// The thread that waits on every pin's resample fd and re-asserts what is still pending. One
/// per VM, started with the first pin; dropping it stops and joins the thread.
#[derive(Default)]
pub struct IntxResampler {
    running: Mutex<Option<Running>>,
}

struct Running {
    epoll: Arc<Epoll>,
    /// Indexed by epoll token; a removed pin leaves its token empty.
    pins: Arc<Mutex<Vec<Option<Arc<IntxPin>>>>>,
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

const KILL_TOKEN: u64 = u64::MAX;

impl IntxResampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts serving `pin`'s resamples (pins may be added while the thread runs).
    pub fn add(&self, pin: Arc<IntxPin>) -> io::Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.is_none() {
            *running = Some(Running::start()?);
        }
        let Some(r) = running.as_ref() else {
            return Err(io::Error::other("INTx resampler not running"));
        };
        let mut pins = r.pins.lock().unwrap_or_else(|p| p.into_inner());
        let token = pins.len() as u64;
        r.epoll.ctl(
            ControlOperation::Add,
            pin.resample_fd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        pins.push(Some(pin));
        Ok(())
    }

    /// Stops serving `pin`'s resamples (its device is being unplugged).
    pub fn remove(&self, pin: &Arc<IntxPin>) -> io::Result<()> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = running.as_ref() else {
            return Ok(());
        };
        let mut pins = r.pins.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = pins
            .iter_mut()
            .find(|p| p.as_ref().is_some_and(|p| Arc::ptr_eq(p, pin)))
        else {
            return Ok(());
        };
        *entry = None;
        r.epoll.ctl(
            ControlOperation::Delete,
            pin.resample_fd().as_raw_fd(),
            EpollEvent::default(),
        )
    }
}

impl Running {
    fn start() -> io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        let pins: Arc<Mutex<Vec<Option<Arc<IntxPin>>>>> = Arc::default();
        let (thread_epoll, thread_pins) = (epoll.clone(), pins.clone());
        let handle = std::thread::Builder::new()
            .name("intx-resample".into())
            .spawn(move || serve(&thread_epoll, &thread_pins))?;
        Ok(Self {
            epoll,
            pins,
            kill,
            handle: Some(handle),
        })
    }
}

fn serve(epoll: &Epoll, pins: &Mutex<Vec<Option<Arc<IntxPin>>>>) {
    let mut ready = [EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("INTx resampler: epoll_wait: {e}");
                return;
            }
        };
        for ev in &ready[..n] {
            if ev.data() == KILL_TOKEN {
                return;
            }
            let pin = pins
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(ev.data() as usize)
                .cloned()
                .flatten();
            if let Some(pin) = pin {
                if let Err(e) = pin.resampled() {
                    tracing::warn!("INTx: re-raising the line: {e}");
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.kill.write(1);
            if handle.join().is_err() {
                tracing::error!("INTx resampler thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;
    use std::time::{Duration, Instant};

    /// A stand-in for a device's ISR.
    #[derive(Default)]
    struct Level(AtomicU8);
    impl IntxLevel for Level {
        fn asserted(&self) -> bool {
            self.0.load(Ordering::SeqCst) != 0
        }
    }

    fn pin() -> (Arc<IntxPin>, Arc<Level>) {
        let level = Arc::new(Level::default());
        (Arc::new(IntxPin::new(level.clone()).unwrap()), level)
    }

    fn raised(pin: &IntxPin) -> u64 {
        pin.trigger_fd().read().unwrap_or(0)
    }

    #[test]
    fn asserts_only_while_the_condition_holds_and_unmasked() {
        let (pin, level) = pin();
        pin.assert().unwrap();
        assert_eq!(raised(&pin), 0, "nothing pending");
        level.0.store(1, Ordering::SeqCst);
        assert!(pin.pending());
        pin.assert().unwrap();
        assert_eq!(raised(&pin), 1);

        pin.set_masked(true);
        pin.assert().unwrap();
        assert_eq!(raised(&pin), 0, "Interrupt Disable / MSI-X holds it back");
        assert!(pin.pending(), "still visible as Interrupt Status");
        pin.set_masked(true);
        assert_eq!(raised(&pin), 0);
        pin.set_masked(false);
        assert_eq!(raised(&pin), 1, "raised on unmask");

        level.0.store(0, Ordering::SeqCst);
        pin.set_masked(true);
        pin.set_masked(false);
        assert_eq!(raised(&pin), 0, "nothing pending on unmask");
    }

    #[test]
    fn resample_reasserts_while_pending() {
        let (pin, level) = pin();
        level.0.store(1, Ordering::SeqCst);
        pin.resample_fd().write(1).unwrap();
        pin.resampled().unwrap();
        assert_eq!(raised(&pin), 1, "EOI with the ISR still set: up again");
        assert!(pin.resample_fd().read().is_err(), "resample fd drained");
        level.0.store(0, Ordering::SeqCst);
        pin.resampled().unwrap();
        assert_eq!(raised(&pin), 0, "ISR read: the line stays down");
        level.0.store(1, Ordering::SeqCst);
        pin.set_masked(true);
        pin.resampled().unwrap();
        assert_eq!(raised(&pin), 0, "masked: stays down");
    }

    fn wait_raised(pin: &IntxPin) -> u64 {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(n) = pin.trigger_fd().read() {
                return n;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        0
    }

    #[test]
    fn the_thread_serves_every_pin_and_stops_on_drop() {
        let resampler = IntxResampler::new();
        let (a, la) = pin();
        let (b, lb) = pin();
        resampler.add(a.clone()).unwrap();
        resampler.add(b.clone()).unwrap();
        la.0.store(1, Ordering::SeqCst);
        // A shared GSI: KVM signals both resample fds; only the pending pin re-raises.
        a.resample_fd().write(1).unwrap();
        b.resample_fd().write(1).unwrap();
        assert_eq!(wait_raised(&a), 1);
        std::thread::sleep(Duration::from_millis(20));
        assert!(b.trigger_fd().read().is_err());
        lb.0.store(1, Ordering::SeqCst);
        b.resample_fd().write(1).unwrap();
        assert_eq!(wait_raised(&b), 1);
        // An unplugged pin is let go of and no longer re-raised.
        resampler.remove(&b).unwrap();
        resampler.remove(&b).unwrap();
        assert_eq!(Arc::strong_count(&b), 1);
        b.resample_fd().write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(b.trigger_fd().read().is_err(), "removed: not served");
        a.resample_fd().write(1).unwrap();
        assert_eq!(wait_raised(&a), 1, "the others still are");
        drop(resampler);
        assert_eq!(Arc::strong_count(&a), 1, "the thread let go of its pins");
    }
}
