//! A booted VM: its vCPU threads, and what the host can do to it while it runs — pause, resume,
//! stop — plus the figures it reports.

use std::collections::BTreeMap;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyperpool_devices::legacy::Ged;
use hyperpool_devices::{ExitRequest, ExitSignal};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::counters::VcpuCounters;
use crate::error::{Error, Result};
use crate::machine::Machine;
use crate::pause::PauseGate;
use crate::serial_io::HostInput;
use crate::vcpu::{self, VcpuShared};

/// How long vCPU threads get to leave KVM_RUN after a stop or pause.
const STOP_DEADLINE: Duration = Duration::from_secs(2);
/// How often a vCPU that has not left KVM_RUN yet is signalled again.
const KICK_INTERVAL: Duration = Duration::from_micros(50);

pub struct RunningVm {
    threads: Vec<JoinHandle<()>>,
    exit: Arc<ExitSignal>,
    gate: Arc<PauseGate>,
    counters: Vec<Arc<VcpuCounters>>,
    input: HostInput,
    booted: Instant,
    memory_size: u64,
    /// Keeps the VM, its memory and devices alive while the vCPUs run; dropped last.
    machine: Machine,
}

impl RunningVm {
    /// Starts a thread per vCPU. If one cannot start, the others are stopped again.
    pub fn start(mut machine: Machine) -> Result<Self> {
        install_vcpu_kick_handler()?;
        let shared = VcpuShared {
            buses: machine.buses.clone(),
            exit: machine.exit.clone(),
            gate: Arc::new(PauseGate::default()),
            memory: machine.memory.clone(),
        };
        let count = machine.vcpus.len() as u32;
        let mut threads = Vec::new();
        let mut counters = Vec::new();
        for (id, fd) in (0..count).zip(machine.vcpus.drain(..)) {
            let c = Arc::new(VcpuCounters::default());
            match vcpu::spawn(fd, id, shared.clone(), c.clone()) {
                Ok(t) => {
                    threads.push(t);
                    counters.push(c);
                }
                Err(e) => {
                    shared.exit.request(ExitRequest::VmmError(e.to_string()));
                    stop_threads(threads);
                    return Err(e);
                }
            }
        }
        Ok(Self {
            threads,
            exit: shared.exit,
            gate: shared.gate,
            counters,
            input: machine.input.clone(),
            booted: Instant::now(),
            memory_size: machine.memory.iter().map(|r| r.len()).sum(),
            machine,
        })
    }

    /// The VM's devices, for hotplug (`hotplug.rs`).
    pub fn machine_mut(&mut self) -> &mut Machine {
        &mut self.machine
    }

    /// The latch devices, vCPUs and the host use to end this VM.
    pub fn exit(&self) -> &Arc<ExitSignal> {
        &self.exit
    }

    /// Where host input for the guest's console goes.
    pub fn input(&self) -> &HostInput {
        &self.input
    }

    /// Parks every vCPU outside the guest. Fails (and resumes) if one does not stop in time.
    pub fn pause(&self) -> Result<()> {
        self.gate.close();
        let deadline = Instant::now() + STOP_DEADLINE;
        while !self.gate.wait_parked(self.threads.len(), KICK_INTERVAL) {
            if Instant::now() > deadline || self.exit.is_set() {
                self.gate.open();
                return Err(Error::Devices(
                    "the vCPUs did not pause in time (the VM keeps running)".into(),
                ));
            }
            for t in &self.threads {
                let _ = t.kill(SIGRTMIN());
            }
        }
        Ok(())
    }

    /// Presses the ACPI power button; a guest that handles it shuts down.
    pub fn power_button(&self) -> Result<()> {
        self.machine
            .ged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notify(Ged::POWER_BUTTON)
            .map_err(Error::io("raising the power button interrupt"))
    }

    pub fn resume(&self) {
        self.gate.open();
    }

    pub fn is_paused(&self) -> bool {
        self.gate.is_closed()
    }

    pub fn uptime(&self) -> Duration {
        self.booted.elapsed()
    }

    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    /// Bytes of guest memory the host has actually backed (pages the guest touched).
    pub fn resident_memory(&self) -> u64 {
        self.machine
            .memory
            .iter()
            .map(|r| resident_bytes(r.as_ptr(), r.len() as usize))
            .sum()
    }

    /// Exit counts per vCPU (`vcpu0`, ...) and I/O counts per device (`disk0`, `net0`, ...).
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let vcpus = self
            .counters
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("vcpu{i}"), c.snapshot()));
        let devices = self
            .machine
            .devices
            .iter()
            .map(|d| (d.id.clone(), d.counters.snapshot()));
        vcpus.chain(devices).collect()
    }

    /// Ends the VM: asks for `request` (unless something asked first), stops the vCPU threads
    /// and returns the request that won. The VM is destroyed when the returned value is dropped.
    pub fn stop(mut self, request: ExitRequest) -> ExitRequest {
        self.exit.request(request);
        self.gate.open();
        stop_threads(std::mem::take(&mut self.threads));
        self.exit.wait()
    }
}

/// How much of `[addr, addr + len)` (a page-aligned mapping of ours) is in RAM, by mincore(2).
fn resident_bytes(addr: *const u8, len: usize) -> u64 {
    const PAGE: usize = 4096;
    let mut map = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `addr..addr+len` is one of our guest memory mappings (page-aligned, alive while
    // `self.machine` is), and `map` has one byte per page of it, as mincore writes.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, map.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    map.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE as u64
}

/// Interrupts every vCPU thread until it has seen the exit request and returned. Repeats the kick
/// because a signal sent just before a thread re-enters KVM_RUN would otherwise be missed.
fn stop_threads(threads: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + STOP_DEADLINE;
    let mut remaining = threads;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            // A vCPU stuck in a device (e.g. a blocked console write) must not keep the VMM
            // alive: the process is about to exit or rebuild, and the thread holds its own
            // references to what it uses.
            tracing::error!(
                "{} vCPU thread(s) did not stop within {STOP_DEADLINE:?}",
                remaining.len()
            );
            return;
        }
        for t in &remaining {
            let _ = t.kill(SIGRTMIN());
        }
        std::thread::sleep(KICK_INTERVAL);
        let (done, running): (Vec<_>, Vec<_>) =
            remaining.into_iter().partition(|t| t.is_finished());
        for t in done {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        remaining = running;
    }
}

extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that makes a vCPU thread leave KVM_RUN does nothing else.
fn install_vcpu_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), kick)
            .map_err(|e| Error::io("installing the vCPU kick signal handler")(e.into()));
    });
    result
}
