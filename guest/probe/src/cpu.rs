//! GDT (kernel + user segments, TSS) and an IDT that reports CPU exceptions on COM1.
//!
//! Selector layout (fixed, `user.rs` relies on it for STAR):
//! 0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user code, 0x28 TSS.
//! Every exception runs on IST stack 1, so a fault with a clobbered stack (or the red zone)
//! still gets reported. Vector 3 (#BP, DPL 3, IST2) is the ring-3 → ring-0 return gate of
//! `user.rs` (`int3` from ring 3).

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::control::Cr2;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::{PrivilegeLevel, VirtAddr};

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;

const IST_STACK_SIZE: usize = 16 * 1024;

/// A static written once by the BSP during `init` and read-only afterwards.
struct InitCell<T>(UnsafeCell<MaybeUninit<T>>);
// SAFETY: written only during single-threaded init (BSP, interrupts off), then shared read-only.
unsafe impl<T> Sync for InitCell<T> {}

impl<T> InitCell<T> {
    const fn new() -> Self {
        Self(UnsafeCell::new(MaybeUninit::uninit()))
    }
    /// # Safety
    /// Must be called once, before any `get`, with no concurrent access.
    unsafe fn set(&self, v: T) -> &'static T
    where
        Self: 'static,
    {
        // SAFETY: caller guarantees exclusive access; the cell lives for 'static.
        unsafe { (*self.0.get()).write(v) }
    }
}

static TSS: InitCell<TaskStateSegment> = InitCell::new();
static GDT: InitCell<GlobalDescriptorTable> = InitCell::new();
static IDT: InitCell<InterruptDescriptorTable> = InitCell::new();

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
    .pushsection .text.isr, "ax"
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
isr_stub_\n:
    .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    pushq $0
    .endif
    pushq $\n
    jmp isr_common
    .endr
isr_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call {handler}
    ud2
    .popsection

    .pushsection .rodata.isr_table, "a"
    .balign 8
    .globl isr_table
isr_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_stub_\n
    .endr
    .popsection
"#,
    handler = sym exception_handler,
    options(att_syntax)
);

unsafe extern "C" {
    static isr_table: [u64; 32];
}

extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
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

fn stack_top(stack: *mut [u8; IST_STACK_SIZE]) -> VirtAddr {
    VirtAddr::from_ptr(stack) + IST_STACK_SIZE as u64
}

/// Loads the GDT, TSS and exception IDT. BSP only, once, interrupts off.
pub fn init() {
    let mut tss = TaskStateSegment::new();
    tss.interrupt_stack_table[0] = stack_top(&raw mut IST_STACK);
    tss.interrupt_stack_table[1] = stack_top(&raw mut RSP0_STACK);
    tss.privilege_stack_table[0] = stack_top(&raw mut RSP0_STACK);
    // SAFETY: single call during BSP init.
    let tss: &'static TaskStateSegment = unsafe { TSS.set(tss) };

    let mut gdt = GlobalDescriptorTable::new();
    let kcs = gdt.append(Descriptor::kernel_code_segment());
    let kds = gdt.append(Descriptor::kernel_data_segment());
    let uds = gdt.append(Descriptor::user_data_segment());
    let ucs = gdt.append(Descriptor::user_code_segment());
    let tss_sel = gdt.append(Descriptor::tss_segment(tss));
    debug_assert_eq!(
        (kcs.0, kds.0, uds.0, ucs.0, tss_sel.0),
        (KERNEL_CS, KERNEL_DS, USER_DS, USER_CS, 0x28)
    );
    // SAFETY: single call during BSP init.
    let gdt: &'static GlobalDescriptorTable = unsafe { GDT.set(gdt) };
    gdt.load();
    // SAFETY: the selectors index valid descriptors of the GDT just loaded.
    unsafe {
        CS::set_reg(SegmentSelector(KERNEL_CS));
        DS::set_reg(SegmentSelector(KERNEL_DS));
        ES::set_reg(SegmentSelector(KERNEL_DS));
        SS::set_reg(SegmentSelector(KERNEL_DS));
        load_tss(tss_sel);
    }

    let mut idt = InterruptDescriptorTable::new();
    // SAFETY: isr_table holds the 32 stub addresses assembled above; every stub is a valid
    // handler entry and IST index 0 (= IST1) is set in the TSS.
    unsafe {
        let t = &isr_table;
        macro_rules! set {
            ($($field:ident = $vec:expr),* $(,)?) => {$(
                idt.$field.set_handler_addr(VirtAddr::new(t[$vec])).set_stack_index(0);
            )*};
        }
        set!(
            divide_error = 0,
            debug = 1,
            non_maskable_interrupt = 2,
            breakpoint = 3,
            overflow = 4,
            bound_range_exceeded = 5,
            invalid_opcode = 6,
            device_not_available = 7,
            double_fault = 8,
            invalid_tss = 10,
            segment_not_present = 11,
            stack_segment_fault = 12,
            general_protection_fault = 13,
            page_fault = 14,
            x87_floating_point = 16,
            alignment_check = 17,
            machine_check = 18,
            simd_floating_point = 19,
            virtualization = 20,
            cp_protection_exception = 21,
            hv_injection_exception = 28,
            vmm_communication_exception = 29,
            security_exception = 30,
        );
    }
    // SAFETY: the ring-3 return stub from user.rs is a valid gate target; DPL 3 lets ring 3
    // raise it with `int`; IST index 1 (= IST2) is set in the TSS.
    unsafe {
        idt.breakpoint
            .set_handler_addr(crate::user::return_gate_addr())
            .set_privilege_level(PrivilegeLevel::Ring3)
            .set_stack_index(1);
    }
    // SAFETY: single call during BSP init.
    let idt: &'static InterruptDescriptorTable = unsafe { IDT.set(idt) };
    idt.load();
}
