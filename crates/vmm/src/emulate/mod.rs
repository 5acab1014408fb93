//! Finishing instructions the host's KVM gave up on.
//!
//! On PVM hosts guest ring 0 runs in KVM's instruction emulator, which cannot do a few things a
//! stock kernel does (`lock cmpxchg16b`, `int3`): KVM stops with an emulation failure. Here the
//! instruction is decoded (iced-x86) from the bytes KVM reports or from guest memory, and carried
//! out as the CPU would — exceptions it raises included — so the vCPU can resume. Anything not
//! known here stays fatal, with the decoded instruction in the message.

mod cmpxchg16b;
mod fsgsbase;
pub mod kvm;
mod ldmxcsr;
mod operands;
mod popcnt;
mod smap;
mod swapgs;
pub mod translate;
mod x87_wait;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use operands::OperandError;
use translate::{Access, Accessor, translate};

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

const ZF: u64 = 1 << 6;
const BP_VECTOR: u8 = 3;
/// #UD and #NM, raised by several instructions here.
const UD_VECTOR: u8 = 6;
const NM_VECTOR: u8 = 7;

/// The instruction kinds completed here; each has a counter in `vm.counters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int3,
    LockCmpxchg16b,
    Popcnt,
    ClacStac,
    FsGsBase,
    Swapgs,
    Fwait,
    Ldmxcsr,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Int3,
        Kind::LockCmpxchg16b,
        Kind::Popcnt,
        Kind::ClacStac,
        Kind::FsGsBase,
        Kind::Swapgs,
        Kind::Fwait,
        Kind::Ldmxcsr,
    ];

    /// Its index in [`Kind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name in logs and counters.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Int3 => "int3",
            Kind::LockCmpxchg16b => "lock_cmpxchg16b",
            Kind::Popcnt => "popcnt",
            Kind::ClacStac => "clac_stac",
            Kind::FsGsBase => "fsgsbase",
            Kind::Swapgs => "swapgs",
            Kind::Fwait => "fwait",
            Kind::Ldmxcsr => "ldmxcsr",
        }
    }
}

/// The registers the instruction ran with.
#[derive(Debug, Clone, Copy)]
pub struct CpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// MSR_KERNEL_GS_BASE, what `swapgs` exchanges GS.base with.
    pub kernel_gs_base: u64,
    /// The x87 status word (FSW), for `fwait`.
    pub fpu_status: u16,
}

impl CpuState {
    fn accessor(&self) -> Accessor {
        Accessor {
            user: self.sregs.cs.selector & 3 == 3,
            rflags: self.regs.rflags,
        }
    }
}

/// An exception for the guest, as KVM_SET_VCPU_EVENTS takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// The faulting address, for #PF (goes to CR2).
    pub address: Option<u64>,
}

/// What became of the instruction; `regs` is the register file to resume with.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub kind: Kind,
    pub regs: kvm_regs,
    /// Set when the instruction raised an exception; `regs.rip` is then what the CPU would push:
    /// the instruction itself for a fault, the next one for a trap such as `int3`.
    pub exception: Option<Exception>,
    /// Special registers to resume with, when the instruction changed one (FS/GS bases).
    pub sregs: Option<kvm_sregs>,
    /// MSR_KERNEL_GS_BASE to resume with, when the instruction changed it (`swapgs`).
    pub kernel_gs_base: Option<u64>,
    /// MXCSR to resume with, when the instruction loaded it (`ldmxcsr`).
    pub mxcsr: Option<u32>,
}

impl Exception {
    /// An exception without error code or faulting address (#BP, #UD, #NM, #MF).
    pub fn plain(vector: u8) -> Self {
        Self {
            vector,
            error_code: None,
            address: None,
        }
    }
}

impl Completion {
    /// The instruction done: resume with `regs`, nothing else changed.
    pub fn done(kind: Kind, regs: kvm_regs) -> Self {
        Self {
            kind,
            regs,
            exception: None,
            sregs: None,
            kernel_gs_base: None,
            mxcsr: None,
        }
    }

    /// The instruction raised `exception`; `regs.rip` is what the CPU would push.
    pub fn raised(kind: Kind, regs: kvm_regs, exception: Exception) -> Self {
        Self {
            exception: Some(exception),
            ..Self::done(kind, regs)
        }
    }
}

/// Why an instruction could not be completed: the message says what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unhandled(pub String);

impl std::fmt::Display for Unhandled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decodes the instruction at RIP from `bytes` (what KVM reported or what guest memory holds) and
/// carries it out on `mem`.
pub fn complete(
    bytes: &[u8],
    state: &CpuState,
    mem: &GuestMemoryMmap,
) -> Result<Completion, Unhandled> {
    let insn = decode(bytes, state)?;
    let shown = describe(&insn, bytes);
    match insn.code() {
        Code::Int3 => Ok(Completion::raised(
            Kind::Int3,
            kvm_regs {
                rip: insn.next_ip(),
                ..state.regs
            },
            Exception::plain(BP_VECTOR),
        )),
        Code::Cmpxchg16b_m128 => cmpxchg16b::complete(&insn, state, mem),
        Code::Popcnt_r16_rm16 | Code::Popcnt_r32_rm32 | Code::Popcnt_r64_rm64 => {
            popcnt::complete(&insn, state, mem)
        }
        Code::Clac | Code::Stac => Ok(smap::complete(&insn, state)),
        Code::Rdfsbase_r32
        | Code::Rdfsbase_r64
        | Code::Rdgsbase_r32
        | Code::Rdgsbase_r64
        | Code::Wrfsbase_r32
        | Code::Wrfsbase_r64
        | Code::Wrgsbase_r32
        | Code::Wrgsbase_r64 => fsgsbase::complete(&insn, state),
        Code::Swapgs => Ok(swapgs::complete(&insn, state)),
        Code::Wait => Ok(x87_wait::complete(&insn, state)),
        Code::Ldmxcsr_m32 => ldmxcsr::complete(&insn, state, mem),
        _ => {
            return Err(Unhandled(format!(
                "{shown}: the VMM does not complete this instruction"
            )));
        }
    }
    .map_err(|e| match e {
        OperandError::Fail(why) => Unhandled(format!("{shown}: {why}")),
        // Instructions turn faults into completions that raise them; one that did not is a bug
        // here, and the VM stops rather than going on wrongly.
        OperandError::Fault(e) => Unhandled(format!("{shown}: unexpected fault {e:?}")),
    })
}

/// Decodes one instruction at CS:RIP in the vCPU's current mode.
fn decode(bytes: &[u8], state: &CpuState) -> Result<Instruction, Unhandled> {
    let cs = &state.sregs.cs;
    let bitness = if cs.l != 0 {
        64
    } else if cs.db != 0 {
        32
    } else {
        16
    };
    let mut decoder = Decoder::with_ip(bitness, bytes, state.regs.rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(Unhandled(format!(
            "undecodable bytes [{}] at rip {:#x} ({bitness}-bit)",
            hex(bytes),
            state.regs.rip
        )));
    }
    Ok(insn)
}

/// The instruction for humans: prefix, iced's name for the form, and its bytes.
pub fn describe(insn: &Instruction, bytes: &[u8]) -> String {
    let len = insn.len().min(bytes.len());
    format!(
        "{}{:?} at rip {:#x} (bytes {})",
        if insn.has_lock_prefix() { "lock " } else { "" },
        insn.code(),
        insn.ip(),
        hex(&bytes[..len])
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fetches up to [`MAX_INSN_LEN`] instruction bytes at CS:RIP from guest memory, page by page
/// through the guest's page tables, stopping at the first page that cannot be read.
pub fn fetch(state: &CpuState, mem: &GuestMemoryMmap) -> Vec<u8> {
    let start = state.sregs.cs.base.wrapping_add(state.regs.rip);
    let mut out = Vec::with_capacity(MAX_INSN_LEN);
    while out.len() < MAX_INSN_LEN {
        let gva = start.wrapping_add(out.len() as u64);
        let in_page = (0x1000 - (gva & 0xfff)) as usize;
        let want = in_page.min(MAX_INSN_LEN - out.len());
        let Ok(gpa) = translate(mem, &state.sregs, gva, Access::Fetch, state.accessor()) else {
            break;
        };
        let mut buf = vec![0u8; want];
        if mem.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
            break;
        }
        out.extend_from_slice(&buf);
    }
    out
}

/// A vCPU and memory for the instruction tests.
#[cfg(test)]
pub(crate) mod test_machine {
    pub use super::translate::tests::{MIB, long_mode, map_4k};
    use super::*;
    use kvm_bindings::kvm_segment;

    pub const CODE_GVA: u64 = 0xffff_ffff_8131_7850;
    pub const DATA_GVA: u64 = 0xffff_ea00_000f_1000;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB)]).unwrap()
    }

    /// A 64-bit ring-0 vCPU with the code page and one data page mapped.
    pub fn machine(mem: &GuestMemoryMmap) -> CpuState {
        map_4k(mem, CODE_GVA, 0x10_0000, 0x1);
        map_4k(mem, DATA_GVA, 0x20_0000, 0x3);
        let mut sregs = long_mode(0x1000);
        sregs.cs = kvm_segment {
            selector: 0x10,
            l: 1,
            ..Default::default()
        };
        sregs.gs.base = 0x1000;
        CpuState {
            regs: kvm_regs {
                rip: CODE_GVA,
                rflags: 0x2,
                ..Default::default()
            },
            sregs,
            kernel_gs_base: 0,
            fpu_status: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_machine::*;
    use super::*;

    /// `lock cmpxchg16b [rbp+0x20]`.
    const CMPXCHG16B_RBP_20: &[u8] = &[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20, 0x74, 0x20];

    #[test]
    fn int3_is_raised_as_a_trap() {
        let mem = memory();
        let state = machine(&mem);
        let done = complete(&[0xcc, 0x90], &state, &mem).unwrap();
        assert_eq!(done.kind, Kind::Int3);
        assert_eq!(done.regs.rip, CODE_GVA + 1, "a trap pushes the next RIP");
        assert_eq!(
            done.exception,
            Some(Exception {
                vector: 3,
                error_code: None,
                address: None
            })
        );
        assert_eq!(done.regs.rax, state.regs.rax);
    }

    #[test]
    fn unknown_and_garbage_instructions_are_refused_with_their_name() {
        let mem = memory();
        let state = machine(&mem);
        // xrstor [rdi]
        let err = complete(&[0x0f, 0xae, 0x2f], &state, &mem).unwrap_err();
        assert!(err.0.contains("Xrstor_mem"), "{err}");
        assert!(err.0.contains("0f ae 2f"), "{err}");
        let err = complete(&[0x48, 0x0f], &state, &mem).unwrap_err();
        assert!(err.0.contains("undecodable"), "{err}");
        let err = complete(&[], &state, &mem).unwrap_err();
        assert!(err.0.contains("undecodable"), "{err}");
    }

    #[test]
    fn fetch_reads_across_pages_and_stops_at_a_hole() {
        let mem = memory();
        let mut state = machine(&mem);
        mem.write_slice(&[0xf0, 0x48, 0x0f], GuestAddress(0x10_0ffd))
            .unwrap();
        state.regs.rip = CODE_GVA + 0xffd - 0x850;
        // The next page is not mapped: only the three bytes of this one.
        assert_eq!(fetch(&state, &mem), vec![0xf0, 0x48, 0x0f]);
        map_4k(&mem, state.regs.rip + 3, 0x30_0000, 0x1);
        mem.write_slice(&[0xc7, 0x4d, 0x20], GuestAddress(0x30_0000))
            .unwrap();
        let bytes = fetch(&state, &mem);
        assert_eq!(bytes.len(), MAX_INSN_LEN);
        assert_eq!(&bytes[..6], CMPXCHG16B_RBP_20[..6].as_ref());
    }
}
