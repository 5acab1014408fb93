//! The lifecycle of one VM process: validate, build, run until the guest or the host ends it,
//! restart on reboot when asked, and say why it ended.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hyperpool_devices::legacy::DebugExit;
use hyperpool_devices::{ExitRequest, ExitSignal};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::arch::boot;
use crate::arch::layout::MIN_MEMORY;
use crate::config::{ConsoleConfig, OnReboot, SerialConfig, VmConfig};
use crate::error::{Error, Result};
use crate::machine::{self, BootImages, Machine};
use crate::running::RunningVm;
use crate::{host, serial_io};

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Poweroff,
    Reset,
    DebugExit(u8),
    Signal(i32),
    /// Stopped through the API (`vm.shutdown`, `vmm.shutdown`).
    Stopped,
    GuestFatal(String),
}

impl Outcome {
    /// The VMM process's exit status.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Poweroff | Outcome::Reset | Outcome::Signal(_) | Outcome::Stopped => 0,
            Outcome::DebugExit(v) => DebugExit::exit_code(*v),
            Outcome::GuestFatal(_) => GUEST_FATAL_EXIT_CODE,
        }
    }
}

const PAGE_SIZE: u64 = 4096;

/// Even, so it never collides with a debug-exit code (always odd).
pub const GUEST_FATAL_EXIT_CODE: i32 = 4;

/// Checks the configuration against this host before anything is built.
pub fn validate(cfg: &VmConfig, max_vcpus: u32, host_memory: Option<u64>) -> Result<()> {
    let cpus = cfg.cpus.boot;
    if cpus == 0 {
        return Err(Error::Config("--cpus: a VM needs at least 1 vCPU".into()));
    }
    if cpus > max_vcpus {
        return Err(Error::Config(format!(
            "--cpus: {cpus} vCPUs asked, this host's KVM allows at most {max_vcpus}"
        )));
    }
    let mem = cfg.memory.size;
    if mem < MIN_MEMORY {
        return Err(Error::Config(format!(
            "--memory: {} MiB is too small; give at least {} MiB",
            mem >> 20,
            MIN_MEMORY >> 20
        )));
    }
    if mem % PAGE_SIZE != 0 {
        return Err(Error::Config(format!(
            "--memory: {mem} bytes is not a whole number of 4 KiB pages; use a size like 512M or 1G"
        )));
    }
    if let Some(host) = host_memory.filter(|&h| mem > h) {
        return Err(Error::Config(format!(
            "--memory: {} MiB asked but the host has only {} MiB",
            mem >> 20,
            host >> 20
        )));
    }
    Ok(())
}

/// Reads the kernel (or takes the built-in probe) and the initramfs, and picks the protocol.
/// Done again for each boot so a running VM does not keep a copy of its kernel in memory.
pub(crate) fn load_images(cfg: &VmConfig) -> Result<BootImages<'static>> {
    let limit = cfg.memory.size;
    let (kernel, kernel_name): (Cow<'static, [u8]>, String) = match &cfg.kernel {
        Some(path) => (
            Cow::Owned(read_image(path, limit).map_err(|source| Error::KernelFile {
                path: path.clone(),
                source,
            })?),
            path.display().to_string(),
        ),
        None => (
            Cow::Borrowed(hyperpool_probe_image::PROBE_ELF),
            "(built-in probe guest)".to_string(),
        ),
    };
    let protocol = boot::detect(&kernel).map_err(|source| Error::Boot {
        path: kernel_name.clone(),
        source,
    })?;
    let initramfs = match &cfg.initramfs {
        Some(path) => Some(
            read_image(path, limit).map_err(|source| Error::InitramfsFile {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    Ok(BootImages {
        kernel,
        protocol,
        kernel_name,
        initramfs,
    })
}

/// Reads a kernel or initramfs: a regular file no larger than guest memory (so `/dev/zero` or a
/// disk image given by mistake is refused instead of read until the host runs out of memory).
fn read_image(path: &std::path::Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} MiB is larger than the guest's memory ({} MiB)",
                meta.len() >> 20,
                limit >> 20
            ),
        ));
    }
    std::fs::read(path)
}

/// Runs the VM described by `cfg`. `start` is when the process started (for the boot timer).
pub fn run(cfg: &VmConfig, start: Instant) -> Result<Outcome> {
    let kvm = host::open_kvm()?;
    validate(cfg, host::max_vcpus(&kvm), host::host_memory())?;
    let mut images = Some(load_images(cfg)?);
    if let Some(images) = &images {
        let template = host::cpu_template(cfg.cpus.template.as_ref());
        tracing::info!(
            "booting {} as {} with {} vCPU(s), {} MiB{}",
            images.kernel_name,
            images.protocol,
            cfg.cpus.boot,
            cfg.memory.size >> 20,
            if template.is_empty() {
                String::new()
            } else {
                format!(", CPU features {template}")
            }
        );
    }

    let signals = SignalForwarder::start()?;
    let io = serial_io::HostIo::new(&cfg.serial)?;
    let input = InputSlot::default();
    // Raw mode and the stdin pump serve whichever console reads stdin (see `serial_io`).
    let _raw = if cfg.serial == SerialConfig::Tty || cfg.console == ConsoleConfig::Tty {
        let raw = serial_io::RawTerminal::enter();
        input.spawn_pump()?;
        raw
    } else {
        None
    };

    loop {
        let boot_images = match images.take() {
            Some(loaded) => loaded,
            None => load_images(cfg)?,
        };
        let machine = machine::build(&kvm, cfg, &boot_images, &io, start)?;
        drop(boot_images);
        let outcome = run_machine(machine, &signals, &input)?;
        match outcome {
            Outcome::Reset if cfg.on_reboot == OnReboot::Restart => {
                if let Some(sig) = signals.received() {
                    return Ok(Outcome::Signal(sig));
                }
                tracing::info!("guest reset: restarting the VM");
            }
            outcome => return Ok(outcome),
        }
    }
}

fn run_machine(machine: Machine, signals: &SignalForwarder, input: &InputSlot) -> Result<Outcome> {
    let vm = RunningVm::start(machine)?;
    signals.attach(vm.exit().clone());
    input.attach(vm.input().clone());
    let request = vm.exit().wait();
    let request = vm.stop(request);
    input.detach();
    outcome(request)
}

/// How an exit request ends this process's run.
pub fn outcome(request: ExitRequest) -> Result<Outcome> {
    Ok(match request {
        ExitRequest::Poweroff => Outcome::Poweroff,
        ExitRequest::Reset => Outcome::Reset,
        ExitRequest::DebugExit(v) => Outcome::DebugExit(v),
        ExitRequest::Signal(s) => Outcome::Signal(s),
        ExitRequest::Stop => Outcome::Stopped,
        ExitRequest::GuestFatal(why) => Outcome::GuestFatal(why),
        ExitRequest::VmmError(why) => return Err(Error::Devices(why)),
    })
}

/// Turns SIGTERM/SIGINT into a stop request for whichever VM is current. A signal that arrives
/// while no VM runs (start-up, between reboots) is kept and stops the next one at once.
struct SignalForwarder {
    state: Arc<Mutex<SignalState>>,
}

#[derive(Default)]
struct SignalState {
    current: Option<Arc<ExitSignal>>,
    received: Option<i32>,
}

impl SignalForwarder {
    fn start() -> Result<Self> {
        let state: Arc<Mutex<SignalState>> = Arc::default();
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
            .map_err(Error::io("installing SIGTERM/SIGINT handlers"))?;
        let target = state.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let mut state = target.lock().unwrap_or_else(|p| p.into_inner());
                    state.received.get_or_insert(sig);
                    if let Some(exit) = &state.current {
                        exit.request(ExitRequest::Signal(sig));
                    }
                }
            })
            .map_err(Error::io("spawning the signal thread"))?;
        Ok(Self { state })
    }

    fn attach(&self, exit: Arc<ExitSignal>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sig) = state.received {
            exit.request(ExitRequest::Signal(sig));
        }
        state.current = Some(exit);
    }

    /// The first stop signal received, if any.
    fn received(&self) -> Option<i32> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .received
    }
}

/// The stdin target of whichever VM is current, fed by one stdin thread for the whole process.
#[derive(Clone, Default)]
struct InputSlot(Arc<Mutex<Option<serial_io::HostInput>>>);

impl InputSlot {
    fn attach(&self, input: serial_io::HostInput) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(input);
    }

    fn detach(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn spawn_pump(&self) -> Result<()> {
        let slot = self.clone();
        serial_io::spawn_stdin_pump(move |bytes| {
            slot.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map_or(bytes.len(), |input| input.push(bytes))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cpus: u32, mem: u64) -> VmConfig {
        let mut c = VmConfig::default();
        c.cpus.boot = cpus;
        c.memory.size = mem;
        c
    }

    #[test]
    fn validation_messages() {
        let host = Some(8u64 << 30);
        assert!(validate(&cfg(1, 128 << 20), 4, host).is_ok());
        let e = validate(&cfg(0, 128 << 20), 4, host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 1 vCPU"), "{e}");
        let e = validate(&cfg(5, 128 << 20), 4, host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 4"), "{e}");
        let e = validate(&cfg(1, 8 << 20), 4, host).unwrap_err().to_string();
        assert!(e.contains("at least 16 MiB"), "{e}");
        let e = validate(&cfg(1, 16 << 30), 4, host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only 8192 MiB"), "{e}");
        assert!(
            validate(&cfg(1, 8 << 20), 4, host)
                .unwrap_err()
                .is_user_error()
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Outcome::Poweroff.exit_code(), 0);
        assert_eq!(Outcome::Reset.exit_code(), 0);
        assert_eq!(Outcome::Signal(15).exit_code(), 0);
        assert_eq!(Outcome::DebugExit(3).exit_code(), 7);
        assert_eq!(Outcome::GuestFatal(String::new()).exit_code(), 4);
    }
}
