//! The KVM side of completing an instruction: what KVM reported with its emulation failure, and
//! putting the result back into the vCPU (registers, and the exception it raised, if any).

use kvm_bindings::{KVM_INTERNAL_ERROR_EMULATION, Msrs, kvm_fpu, kvm_msr_entry, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use super::{Completion, CpuState, Unhandled, complete, fetch};

/// `emulation_failure.flags`: the report carries the instruction's bytes.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// KVM_EXIT_INTERNAL_ERROR's report, copied out of `kvm_run`.
#[derive(Debug, Clone, Default)]
pub struct InternalError {
    pub suberror: u32,
    pub data: Vec<u64>,
    /// The instruction bytes KVM saw, when it says (KVM_INTERNAL_ERROR_EMULATION with
    /// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES).
    pub insn: Option<Vec<u8>>,
}

impl InternalError {
    /// Reads the report of the KVM_EXIT_INTERNAL_ERROR the vCPU just returned with.
    pub fn read(vcpu: &mut VcpuFd) -> Self {
        let run = vcpu.get_kvm_run();
        // SAFETY: the vCPU's last exit was KVM_EXIT_INTERNAL_ERROR (our only caller checks), so
        // KVM filled the `internal` member of the exit union; `emulation_failure` is the layout
        // KVM uses for its emulation suberror, and is only read for that suberror. Both are plain
        // integers, valid for any bit pattern; `ndata` is clamped to the array it indexes.
        let (internal, failure) = unsafe {
            (
                run.__bindgen_anon_1.internal,
                run.__bindgen_anon_1.emulation_failure,
            )
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        let insn = (internal.suberror == KVM_INTERNAL_ERROR_EMULATION
            && n >= 3
            && failure.flags & FLAG_INSTRUCTION_BYTES != 0)
            .then(|| {
                // SAFETY: as above; the flag says KVM wrote `insn_size` and `insn_bytes`.
                let bytes = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
                let len = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
                bytes.insn_bytes[..len].to_vec()
            });
        Self {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
            insn,
        }
    }

    pub fn is_emulation_failure(&self) -> bool {
        self.suberror == KVM_INTERNAL_ERROR_EMULATION
    }

    pub fn describe(&self) -> String {
        let data: Vec<String> = self.data.iter().map(|d| format!("{d:#x}")).collect();
        let kind = if self.is_emulation_failure() {
            "instruction emulation failed"
        } else {
            "internal error"
        };
        format!(
            "KVM {kind} (suberror {}, data [{}])",
            self.suberror,
            data.join(", ")
        )
    }
}

/// Completes the instruction KVM failed to emulate and puts the vCPU where the CPU would have
/// left it. Err: the VM must stop, for the reason given.
pub fn complete_on_vcpu(
    vcpu: &VcpuFd,
    report: &InternalError,
    mem: &GuestMemoryMmap,
) -> Result<Completion, Unhandled> {
    let kvm_err = |what: &str, e: kvm_ioctls::Error| Unhandled(format!("{what}: {e}"));
    let fpu = vcpu.get_fpu().map_err(|e| kvm_err("reading the FPU", e))?;
    let state = CpuState {
        regs: vcpu
            .get_regs()
            .map_err(|e| kvm_err("reading registers", e))?,
        sregs: vcpu
            .get_sregs()
            .map_err(|e| kvm_err("reading special registers", e))?,
        kernel_gs_base: kernel_gs_base(vcpu)?,
        fpu_status: fpu.fsw,
    };
    let bytes = match &report.insn {
        Some(bytes) if !bytes.is_empty() => bytes.clone(),
        _ => fetch(&state, mem),
    };
    let done = complete(&bytes, &state, mem)?;
    vcpu.set_regs(&done.regs)
        .map_err(|e| kvm_err("setting registers", e))?;
    let mut sregs = done.sregs;
    if let Some(address) = done.exception.and_then(|e| e.address) {
        sregs.get_or_insert(state.sregs).cr2 = address;
    }
    if let Some(sregs) = sregs {
        vcpu.set_sregs(&sregs)
            .map_err(|e| kvm_err("setting special registers", e))?;
    }
    if let Some(mxcsr) = done.mxcsr {
        let new = kvm_fpu { mxcsr, ..fpu };
        vcpu.set_fpu(&new)
            .map_err(|e| kvm_err("setting MXCSR", e))?;
    }
    if let Some(base) = done.kernel_gs_base {
        set_kernel_gs_base(vcpu, base)?;
    }
    if let Some(exception) = done.exception {
        let mut events: kvm_vcpu_events = vcpu
            .get_vcpu_events()
            .map_err(|e| kvm_err("reading vCPU events", e))?;
        events.exception.injected = 1;
        events.exception.pending = 0;
        events.exception.nr = exception.vector;
        events.exception.has_error_code = u8::from(exception.error_code.is_some());
        events.exception.error_code = exception.error_code.unwrap_or(0);
        events.exception_has_payload = 0;
        // Only the exception is changed: the other sections are written back as read, so no
        // VALID flag is needed for them.
        events.flags = 0;
        vcpu.set_vcpu_events(&events)
            .map_err(|e| kvm_err("injecting the exception", e))?;
    }
    Ok(done)
}

const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

fn kernel_gs_base(vcpu: &VcpuFd) -> Result<u64, Unhandled> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KERNEL_GS_BASE,
        ..Default::default()
    }])
    .map_err(|e| Unhandled(format!("MSR list: {e:?}")))?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Ok(msrs.as_slice()[0].data),
        Ok(_) => Err(Unhandled("KVM did not return MSR_KERNEL_GS_BASE".into())),
        Err(e) => Err(Unhandled(format!("reading MSR_KERNEL_GS_BASE: {e}"))),
    }
}

fn set_kernel_gs_base(vcpu: &VcpuFd, base: u64) -> Result<(), Unhandled> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KERNEL_GS_BASE,
        data: base,
        ..Default::default()
    }])
    .map_err(|e| Unhandled(format!("MSR list: {e:?}")))?;
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(_) => Err(Unhandled("KVM refused MSR_KERNEL_GS_BASE".into())),
        Err(e) => Err(Unhandled(format!("writing MSR_KERNEL_GS_BASE: {e}"))),
    }
}
