//! GDT (kernel + user segments, TSS), TSS and an IDT that reports CPU exceptions on COM1.
//!
//! All three tables are complete in the image's `.data` (the linker fills in the addresses the
//! descriptor formats split into pieces, see `link.ld`), so setting them up costs no emulated
//! ring-0 work beyond loading them: `boot.rs` loads the GDT, [`init`] the TSS and the IDT.
//!
//! Selector layout (fixed, `user.rs` relies on it for STAR):
//! 0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user code, 0x28 TSS.
//! Every exception runs on IST stack 1, so a fault with a clobbered stack (or the red zone)
//! still gets reported. Vector 3 (#BP, DPL 3, IST2) is the ring-3 → ring-0 return gate of
//! `user.rs` (`int3` from ring 3). Vectors 32..255 are not-present interrupt gates: checks that
//! take interrupts install their own (`apic::install_handlers`); any other interrupt raises
//! #NP, whose error code names the vector, and the handler prints it.

use x86_64::registers::control::Cr2;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

const IST_STACK_SIZE: usize = 16 * 1024;
/// #NP and #GP error codes with this bit refer to an IDT gate (vector in bits 3..15).
const ERROR_IDT: u64 = 1 << 1;
const VEC_NP: u64 = 11;
const VEC_GP: u64 = 13;

#[unsafe(link_section = ".bss.noinit.ist")]
static mut IST_STACK: [u8; IST_STACK_SIZE] = [0; IST_STACK_SIZE];
#[unsafe(link_section = ".bss.noinit.rsp0")]
static mut RSP0_STACK: [u8; IST_STACK_SIZE] = [0; IST_STACK_SIZE];

/// Frame built by `isr_common` (vector, error code, then the CPU's interrupt frame).
#[repr(C)]
struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

core::arch::global_asm!(
    r#"
    /* Exception stubs, 16 bytes apart from isr_stubs (the IDT below relies on the stride; the
       .org fails the build if a stub outgrows it). The 512-byte alignment keeps all 32 in one
       64 KiB block, so they share the upper bits of their address. */
    .pushsection .text.isr, "ax"
    .balign 512
    .globl isr_stubs
isr_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    pushq $0
    .endif
    pushq $\n
    jmp isr_common
    .org isr_stubs + 16 * (\n + 1), 0xcc
    .endr
isr_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call {handler}
    ud2
    .popsection

    .pushsection .data.gdt, "aw"
    .balign 16
    .globl probe_gdt
probe_gdt:
    .quad 0
    .quad 0x00af9b000000ffff            /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00cf93000000ffff            /* 0x10: data, DPL 0 */
    .quad 0x00cff3000000ffff            /* 0x18: data, DPL 3 */
    .quad 0x00affb000000ffff            /* 0x20: 64-bit code, DPL 3 */
    .word probe_tss_end - probe_tss - 1 /* 0x28: available 64-bit TSS (16 bytes) */
    .word __tss_base_0_15
    .byte __tss_base_16_23
    .byte 0x89
    .byte 0
    .byte __tss_base_24_31
    .long __tss_base_32_63
    .long 0
probe_gdt_end:
    .balign 4
    .globl probe_gdt_ptr
probe_gdt_ptr:
    .word probe_gdt_end - probe_gdt - 1
    .quad probe_gdt

    .balign 16
    .globl probe_tss
probe_tss:
    .long 0
    .quad {rsp0} + {stack_size}         /* RSP0: ring 3 -> ring 0 */
    .quad 0, 0, 0
    .quad {ist} + {stack_size}          /* IST1: exceptions, interrupts */
    .quad {rsp0} + {stack_size}         /* IST2: the ring-3 return gate */
    .quad 0, 0, 0, 0, 0, 0
    .word 0
    .word probe_tss_end - probe_tss     /* I/O map base past the end: no I/O bitmap */
probe_tss_end:

    /* Gate: offset 0..15, selector, flags (P, DPL, type 0xE = 64-bit interrupt gate, IST),
       offset 16..31, offset 32..63, reserved. */
    .balign 16
    .globl probe_idt
probe_idt:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .if \n == 3
    .word __user_gate_0_15, {kernel_cs}, 0xee02, __user_gate_16_31
    .long __user_gate_32_63, 0
    .else
    .word __isr_stubs_0_15 + 16 * \n, {kernel_cs}, 0x8e01, __isr_stubs_16_31
    .long __isr_stubs_32_63, 0
    .endif
    .endr
    .rept 256 - 32
    .word 0, 0, 0x0e00, 0
    .long 0, 0
    .endr
probe_idt_end:
    .balign 4
probe_idt_ptr:
    .word probe_idt_end - probe_idt - 1
    .quad probe_idt
    .popsection
"#,
    handler = sym exception_handler,
    ist = sym IST_STACK,
    rsp0 = sym RSP0_STACK,
    stack_size = const IST_STACK_SIZE,
    kernel_cs = const KERNEL_CS,
    options(att_syntax)
);

extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    let idt_gate =
        (frame.vector == VEC_NP || frame.vector == VEC_GP) && frame.error & ERROR_IDT != 0;
    if idt_gate {
        let vector = (frame.error >> 3) & 0x1fff;
        crate::serial::print_fmt_emergency(format_args!(
            "PROBE unexpected interrupt vector={vector} ({vector:#x}): no handler installed\n"
        ));
    }
    crate::serial::print_fmt_emergency(format_args!(
        "PROBE exception vector={} error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} ss={:#x} cr2={:#x}\n",
        frame.vector,
        frame.error,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        frame.ss,
        Cr2::read_raw()
    ));
    crate::end::halt_forever()
}

/// Loads the TSS and the IDT (`boot.rs` loaded the GDT). BSP only, once, interrupts off.
pub fn init() {
    // SAFETY: selector 0x28 is the TSS descriptor of the loaded GDT (not yet busy: loaded
    // once); probe_idt_ptr describes the complete static IDT, whose present gates lead to the
    // stubs above and the user.rs return gate, on IST stacks the TSS provides.
    unsafe {
        core::arch::asm!(
            "ltr {sel:x}",
            "lidt [rip + probe_idt_ptr]",
            sel = in(reg) TSS_SEL,
            options(nostack, preserves_flags)
        );
    }
}
