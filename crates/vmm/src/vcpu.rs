//! vCPUs: their initial state, and the thread that runs each one and handles its exits.

use std::sync::Arc;
use std::thread::JoinHandle;

use hyperpool_devices::{Bus, ExitRequest, ExitSignal};
use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::cpu_template::CpuTemplate;
use crate::arch::cpuid::{self, CpuidParams};
use crate::arch::{msr, regs};
use crate::counters::VcpuCounters;
use crate::emulate::kvm::{InternalError, complete_on_vcpu};
use crate::error::{Error, Result};
use crate::pause::PauseGate;

/// Local APIC register offsets and the delivery modes firmware programs into LINT0/LINT1.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;
const APIC_MODE_NMI: u32 = 0x4 << 8;

/// Everything a vCPU needs to be created.
pub struct VcpuSpec<'a> {
    pub id: u32,
    pub count: u32,
    pub supported_cpuid: &'a CpuId,
    pub template: &'a CpuTemplate,
    /// Only the bootstrap processor gets an entry state; APs wait for INIT/SIPI in the kernel.
    pub entry: Option<regs::Entry>,
}

pub fn create(vm: &VmFd, spec: &VcpuSpec) -> Result<VcpuFd> {
    let vcpu = vm
        .create_vcpu(u64::from(spec.id))
        .map_err(Error::kvm("creating a vCPU"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok().filter(|&k| k > 0);
    let mut entries = spec.supported_cpuid.as_slice().to_vec();
    cpuid::filter(
        &mut entries,
        &CpuidParams {
            vcpu_id: spec.id,
            vcpu_count: spec.count,
            tsc_khz,
            template: spec.template,
        },
    );
    let cpuid = CpuId::from_entries(&entries)
        .map_err(|_| Error::Devices("too many CPUID entries".into()))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(Error::kvm("setting CPUID"))?;

    // Set MSRs one at a time: a host that lacks one (PVM lacks some) still boots the rest.
    for entry in msr::boot_msrs() {
        let msrs = Msrs::from_entries(&[entry]).map_err(|_| Error::Devices("MSR list".into()))?;
        if vcpu.set_msrs(&msrs).map_err(Error::kvm("setting MSRs"))? != 1 {
            tracing::debug!("host KVM refused MSR {:#x}", entry.index);
        }
    }
    vcpu.set_fpu(&regs::fpu())
        .map_err(Error::kvm("setting the FPU"))?;

    let mut lapic = vcpu
        .get_lapic()
        .map_err(Error::kvm("reading the local APIC"))?;
    set_lapic_reg(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lapic_reg(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(Error::kvm("setting the local APIC"))?;

    if let Some(entry) = spec.entry {
        vcpu.set_regs(&regs::regs(entry))
            .map_err(Error::kvm("setting registers"))?;
        let base = vcpu
            .get_sregs()
            .map_err(Error::kvm("reading special registers"))?;
        vcpu.set_sregs(&regs::sregs(entry, &base))
            .map_err(Error::kvm("setting special registers"))?;
    }
    Ok(vcpu)
}

/// Replaces the delivery mode bits of an LVT register, keeping the rest.
fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (b, r) in raw.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let v = (u32::from_le_bytes(raw) & !0x700) | mode;
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(v.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// The buses a vCPU dispatches its I/O exits to.
#[derive(Clone)]
pub struct Buses {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

/// What a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VcpuShared {
    pub buses: Buses,
    pub exit: Arc<ExitSignal>,
    pub gate: Arc<PauseGate>,
    /// For completing instructions KVM could not emulate.
    pub memory: GuestMemoryMmap,
}

/// Starts the thread that runs `vcpu` until `exit` is set, parking while the VM is paused.
pub fn spawn(
    mut vcpu: VcpuFd,
    id: u32,
    shared: VcpuShared,
    counters: Arc<VcpuCounters>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            let exit = &shared.exit;
            let _guard = StopVmOnPanic(exit.clone(), id);
            while !exit.is_set() {
                shared.gate.park_if_paused(exit);
                if exit.is_set() {
                    break;
                }
                if let Some(request) = run_once(&mut vcpu, id, &shared, &counters) {
                    exit.request(request);
                }
            }
        })
        .map_err(Error::io("spawning a vCPU thread"))
}

/// A vCPU thread that dies must not leave the VMM waiting for an exit request forever.
struct StopVmOnPanic(Arc<ExitSignal>, u32);

impl Drop for StopVmOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.request(ExitRequest::VmmError(format!(
                "the vCPU {} thread panicked",
                self.1
            )));
        }
    }
}

/// Runs the vCPU until its next exit and handles it; returns a request when the VM must stop.
fn run_once(
    vcpu: &mut VcpuFd,
    id: u32,
    shared: &VcpuShared,
    counters: &VcpuCounters,
) -> Option<ExitRequest> {
    let count = VcpuCounters::count;
    let buses = &shared.buses;
    let exit = match vcpu.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            count(&counters.interrupted);
            return None;
        }
        Err(e) => {
            return Some(ExitRequest::VmmError(format!(
                "vCPU {id}: KVM_RUN failed: {e}"
            )));
        }
    };
    // Guest-fatal exits are described after the match, once `exit` no longer borrows the vCPU.
    let fatal_what = match exit {
        VcpuExit::IoIn(port, data) => {
            count(&counters.pio);
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            return None;
        }
        VcpuExit::IoOut(port, data) => {
            count(&counters.pio);
            buses.pio.write(u64::from(port), data);
            return None;
        }
        VcpuExit::MmioRead(addr, data) => {
            count(&counters.mmio);
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
            }
            return None;
        }
        VcpuExit::MmioWrite(addr, data) => {
            count(&counters.mmio);
            buses.mmio.write(addr, data);
            return None;
        }
        VcpuExit::Hlt => {
            count(&counters.hlt);
            return None;
        }
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => {
            count(&counters.interrupted);
            return None;
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => return Some(ExitRequest::Poweroff),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => return Some(ExitRequest::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, _) => {
            Some("the guest reported a crash".to_string())
        }
        VcpuExit::SystemEvent(other, _) => Some(format!("unknown KVM system event {other}")),
        VcpuExit::Shutdown => Some("triple fault (KVM_EXIT_SHUTDOWN)".to_string()),
        VcpuExit::FailEntry(reason, cpu) => Some(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
        )),
        // The details live in kvm_run, readable once `exit` is gone.
        VcpuExit::InternalError => None,
        other => Some(format!("unexpected exit {other:?}")),
    };
    let Some(what) = fatal_what else {
        return internal_error(vcpu, id, &shared.memory, counters);
    };
    count(&counters.other);
    Some(fatal(vcpu, id, &what))
}

/// KVM_EXIT_INTERNAL_ERROR: an instruction KVM could not emulate is completed here when the VMM
/// knows it (see `emulate`); anything else stops the VM.
fn internal_error(
    vcpu: &mut VcpuFd,
    id: u32,
    memory: &GuestMemoryMmap,
    counters: &VcpuCounters,
) -> Option<ExitRequest> {
    let report = InternalError::read(vcpu);
    if !report.is_emulation_failure() {
        VcpuCounters::count(&counters.other);
        return Some(fatal(vcpu, id, &report.describe()));
    }
    match complete_on_vcpu(vcpu, &report, memory) {
        Ok(done) => {
            counters.completed(done.kind, id);
            None
        }
        Err(why) => {
            VcpuCounters::count(&counters.other);
            Some(fatal(
                vcpu,
                id,
                &format!(
                    "{}\n  the VMM cannot complete it either: {why}",
                    report.describe()
                ),
            ))
        }
    }
}

/// The stop request for a guest-fatal event, with the vCPU's registers for the post-mortem.
fn fatal(vcpu: &VcpuFd, id: u32, what: &str) -> ExitRequest {
    ExitRequest::GuestFatal(format!("vCPU {id}: {what}\n{}", describe_registers(vcpu)))
}

fn describe_registers(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    if let Ok(r) = vcpu.get_regs() {
        out += &format!(
            "  rip={:#018x} rsp={:#018x} rbp={:#018x} rflags={:#x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} r8={:#018x} r9={:#018x}\n",
            r.rip, r.rsp, r.rbp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.r8, r.r9
        );
    }
    if let Ok(s) = vcpu.get_sregs() {
        out += &format!(
            "  cs={:#x} (base {:#x}, l={} db={}) cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}+{:#x}",
            s.cs.selector,
            s.cs.base,
            s.cs.l,
            s.cs.db,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.idt.base,
            s.idt.limit
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_is_replaced_in_place() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT_LINT0] = 0x30u8 as std::os::raw::c_char;
        regs[APIC_LVT_LINT0 + 1] = 0x07;
        regs[APIC_LVT_LINT0 + 2] = 0x01;
        set_lapic_reg(&mut regs, APIC_LVT_LINT0, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT_LINT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT_LINT0 + 1] as u8, 0x04);
        assert_eq!(regs[APIC_LVT_LINT0 + 2] as u8, 0x01, "mask bit kept");
    }
}
