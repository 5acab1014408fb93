//! Finishing instructions the host's KVM gave up on.
//!
//! On PVM hosts guest ring 0 runs in KVM's instruction emulator, which cannot do a few things a
//! stock kernel does (`lock cmpxchg16b`, `int3`): KVM stops with an emulation failure. Here the
//! instruction is decoded (iced-x86) from the bytes KVM reports or from guest memory, and carried
//! out as the CPU would — exceptions it raises included — so the vCPU can resume. Anything not
//! known here stays fatal, with the decoded instruction in the message.

mod cmpxchg16b;
pub mod kvm;
pub mod translate;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use translate::{Access, Accessor, WalkError, translate};

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

const ZF: u64 = 1 << 6;
const BP_VECTOR: u8 = 3;
const GP_VECTOR: u8 = 13;
const PF_VECTOR: u8 = 14;

/// The instruction kinds completed here; each has a counter in `vm.counters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int3,
    LockCmpxchg16b,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Int3, Kind::LockCmpxchg16b];

    /// Its index in [`Kind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name in logs and counters.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Int3 => "int3",
            Kind::LockCmpxchg16b => "lock_cmpxchg16b",
        }
    }
}

/// The registers the instruction ran with.
#[derive(Debug, Clone, Copy)]
pub struct CpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
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
        Code::Int3 => Ok(Completion {
            kind: Kind::Int3,
            regs: kvm_regs {
                rip: insn.next_ip(),
                ..state.regs
            },
            exception: Some(Exception {
                vector: BP_VECTOR,
                error_code: None,
                address: None,
            }),
        }),
        Code::Cmpxchg16b_m128 => {
            lock_cmpxchg16b(&insn, state, mem).map_err(|why| Unhandled(format!("{shown}: {why}")))
        }
        _ => Err(Unhandled(format!(
            "{shown}: the VMM does not complete this instruction"
        ))),
    }
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

/// `lock cmpxchg16b m128`: compare RDX:RAX with the operand; equal: store RCX:RBX and set ZF;
/// not equal: load the operand into RDX:RAX and clear ZF. The operand must be 16-byte aligned
/// (#GP(0) otherwise) and writable (#PF).
fn lock_cmpxchg16b(
    insn: &Instruction,
    state: &CpuState,
    mem: &GuestMemoryMmap,
) -> Result<Completion, String> {
    let r = &state.regs;
    let fault = |exception: Exception| Completion {
        kind: Kind::LockCmpxchg16b,
        regs: *r,
        exception: Some(exception),
    };
    let gva = memory_operand(insn, state)?;
    if gva % 16 != 0 {
        return Ok(fault(general_protection()));
    }
    let gpa = match translate(mem, &state.sregs, gva, Access::Write, state.accessor()) {
        Ok(gpa) => gpa,
        Err(WalkError::PageFault { error_code }) => {
            return Ok(fault(Exception {
                vector: PF_VECTOR,
                error_code: Some(error_code),
                address: Some(gva),
            }));
        }
        Err(WalkError::NonCanonical) => return Ok(fault(general_protection())),
        Err(e) => return Err(format!("operand at {gva:#x}: {e}")),
    };
    let expected = (u128::from(r.rdx) << 64) | u128::from(r.rax);
    let new = (u128::from(r.rcx) << 64) | u128::from(r.rbx);
    let outcome = cmpxchg16b::cmpxchg16b(mem, gpa, expected, new)
        .ok_or_else(|| format!("operand at {gva:#x} (guest-physical {gpa:#x}) is not RAM"))?;
    let mut regs = kvm_regs {
        rip: insn.next_ip(),
        ..*r
    };
    if outcome.swapped {
        regs.rflags |= ZF;
    } else {
        regs.rflags &= !ZF;
        regs.rax = outcome.previous as u64;
        regs.rdx = (outcome.previous >> 64) as u64;
    }
    Ok(Completion {
        kind: Kind::LockCmpxchg16b,
        regs,
        exception: None,
    })
}

fn general_protection() -> Exception {
    Exception {
        vector: GP_VECTOR,
        error_code: Some(0),
        address: None,
    }
}

/// The linear address of the instruction's memory operand: segment base + base + index * scale +
/// displacement (already absolute for RIP-relative operands), in the instruction's address size.
fn memory_operand(insn: &Instruction, state: &CpuState) -> Result<u64, String> {
    if insn.op0_kind() != OpKind::Memory {
        return Err("no memory operand".into());
    }
    let mut addr = insn.memory_displacement64();
    let base = insn.memory_base();
    if base != Register::None && base != Register::RIP && base != Register::EIP {
        addr = addr.wrapping_add(register(&state.regs, base)?);
    }
    let index = insn.memory_index();
    if index != Register::None {
        let scaled =
            register(&state.regs, index)?.wrapping_mul(u64::from(insn.memory_index_scale()));
        addr = addr.wrapping_add(scaled);
    }
    let address_bits = [base, index]
        .into_iter()
        .find(|r| *r != Register::None && *r != Register::RIP)
        .and_then(gpr)
        .map_or(64, |(_, bits)| bits);
    if address_bits < 64 {
        addr &= (1u64 << address_bits) - 1;
    }
    let s = &state.sregs;
    let segment_base = match insn.memory_segment() {
        Register::FS => s.fs.base,
        Register::GS => s.gs.base,
        // In 64-bit mode the other segments have base 0, whatever their descriptors say.
        _ if s.cs.l != 0 => 0,
        Register::ES => s.es.base,
        Register::CS => s.cs.base,
        Register::SS => s.ss.base,
        _ => s.ds.base,
    };
    Ok(addr.wrapping_add(segment_base))
}

/// A 16-, 32- or 64-bit general-purpose register as (encoding number, width in bits). iced
/// numbers each width's registers contiguously in encoding order (AX, CX, DX, BX, SP, ...).
fn gpr(reg: Register) -> Option<(usize, u32)> {
    [(Register::AX, 16), (Register::EAX, 32), (Register::RAX, 64)]
        .into_iter()
        .find_map(|(first, bits)| {
            let n = (reg as usize).checked_sub(first as usize)?;
            (n < 16).then_some((n, bits))
        })
}

/// A general-purpose register's value, cut to the register's width.
fn register(r: &kvm_regs, reg: Register) -> Result<u64, String> {
    let (n, bits) = gpr(reg).ok_or_else(|| format!("address register {reg:?}"))?;
    let file = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    let full = file[n];
    Ok(if bits == 64 {
        full
    } else {
        full & ((1u64 << bits) - 1)
    })
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

#[cfg(test)]
mod tests {
    use super::translate::tests::{MIB, long_mode, map_4k};
    use super::*;
    use kvm_bindings::kvm_segment;

    const CODE_GVA: u64 = 0xffff_ffff_8131_7850;
    const DATA_GVA: u64 = 0xffff_ea00_000f_1000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB)]).unwrap()
    }

    /// A 64-bit ring-0 vCPU with the code page and one data page mapped.
    fn machine(mem: &GuestMemoryMmap) -> CpuState {
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
        }
    }

    /// `lock cmpxchg16b [rbp+0x20]`, as Linux's SLUB has it (and the bytes after it).
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
    fn cmpxchg16b_swaps_on_match() {
        let mem = memory();
        let mut state = machine(&mem);
        state.regs.rbp = DATA_GVA - 0x20 + 0x40;
        let old: u128 = (0x1111 << 64) | 0x2222;
        mem.write_obj(old, GuestAddress(0x20_0040)).unwrap();
        state.regs.rdx = 0x1111;
        state.regs.rax = 0x2222;
        state.regs.rcx = 0x3333;
        state.regs.rbx = 0x4444;
        let done = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(done.kind, Kind::LockCmpxchg16b);
        assert_eq!(done.exception, None);
        assert_eq!(done.regs.rip, CODE_GVA + 6);
        assert_ne!(done.regs.rflags & ZF, 0);
        assert_eq!((done.regs.rdx, done.regs.rax), (0x1111, 0x2222));
        let now: u128 = mem.read_obj(GuestAddress(0x20_0040)).unwrap();
        assert_eq!(now, (0x3333 << 64) | 0x4444);
        let pte: u64 = mem
            .read_obj(GuestAddress(0x4000 + ((DATA_GVA >> 12) & 0x1ff) * 8))
            .unwrap();
        assert_ne!(pte & (1 << 6), 0, "the page is dirty");
    }

    #[test]
    fn cmpxchg16b_loads_on_mismatch() {
        let mem = memory();
        let mut state = machine(&mem);
        state.regs.rbp = DATA_GVA - 0x20;
        state.regs.rflags |= ZF;
        let old: u128 = (0xdead << 64) | 0xbeef;
        mem.write_obj(old, GuestAddress(0x20_0000)).unwrap();
        state.regs.rcx = 0x3333;
        state.regs.rbx = 0x4444;
        let done = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(done.regs.rflags & ZF, 0);
        assert_eq!((done.regs.rdx, done.regs.rax), (0xdead, 0xbeef));
        assert_eq!(done.regs.rcx, 0x3333);
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x20_0000)).unwrap(), old);
    }

    #[test]
    fn cmpxchg16b_with_gs_and_index() {
        let mem = memory();
        let mut state = machine(&mem);
        // lock cmpxchg16b gs:[rsi+rdi*8+0x10]
        let bytes = [0x65, 0xf0, 0x48, 0x0f, 0xc7, 0x4c, 0xfe, 0x10];
        state.sregs.gs.base = DATA_GVA - 0x1000;
        state.regs.rsi = 0x1000;
        state.regs.rdi = 4;
        let done = complete(&bytes, &state, &mem).unwrap();
        assert_ne!(done.regs.rflags & ZF, 0, "zero matched zero");
        assert_eq!(done.regs.rip, CODE_GVA + 8);
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x20_0030)).unwrap(), 0);
        state.regs.rbx = 7;
        complete(&bytes, &state, &mem).unwrap();
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x20_0030)).unwrap(), 7);
    }

    #[test]
    fn cmpxchg16b_faults_as_the_cpu_would() {
        let mem = memory();
        let mut state = machine(&mem);
        state.regs.rbp = DATA_GVA - 0x20 + 8;
        let gp = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(gp.exception, Some(general_protection()), "misaligned");
        assert_eq!(
            gp.regs.rip, CODE_GVA,
            "a fault pushes the instruction's own RIP"
        );

        let in_code_page = (CODE_GVA & !0xfff) + 0x100;
        state.regs.rbp = in_code_page - 0x20;
        let ro = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(
            ro.exception,
            Some(Exception {
                vector: 14,
                error_code: Some(0b11),
                address: Some(in_code_page)
            }),
            "write to a read-only page"
        );

        state.regs.rbp = 0xffff_c900_0000_0000;
        let np = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(np.exception.unwrap().error_code, Some(0b10));
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
    fn operand_outside_ram_is_refused() {
        let mem = memory();
        let mut state = machine(&mem);
        map_4k(&mem, DATA_GVA, 0x7000_0000, 0x3);
        state.regs.rbp = DATA_GVA - 0x20;
        let err = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap_err();
        assert!(err.0.contains("not RAM"), "{err}");
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
