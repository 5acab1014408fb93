//! Run a function in ring 3 and come back: `iretq` down, `int3` up.
//!
//! Ring-3 code runs natively on PVM (ring 0 is emulated), so benchmark loops go here.
//! The function runs with interrupts disabled (RFLAGS.IF = 0, IOPL 0) on a dedicated user
//! stack. When it returns, `int3` (vector 3 is a DPL-3 interrupt gate on its own IST stack,
//! set up by `cpu.rs`) re-enters ring 0 at `user_return_entry`, which drops the interrupt frame,
//! restores the kernel stack and callee-saved registers and returns RAX (the function's
//! return value) to the caller of `run`. Ring 3 can end the run early the same way:
//! `int3` with the result in RAX.
//!
//! Why not `syscall`: on this host (KVM PVM) a `syscall` from guest ring 3 lands at LSTAR
//! but still at CPL 3 (observed: #GP on the first `mov %ecx, %ds` of the entry stub), while
//! `int $0x80` from ring 3 raises #UD. `int3` and exceptions from ring 3 are delivered
//! normally.

use crate::cpu::{KERNEL_DS, USER_CS, USER_DS};
use alloc::string::String;
use spinning_top::Spinlock;

const USER_STACK_SIZE: usize = 64 * 1024;

#[unsafe(link_section = ".bss.noinit.user_stack")]
static mut USER_STACK: [u8; USER_STACK_SIZE] = [0; USER_STACK_SIZE];

/// A function that can run in ring 3.
pub type UserFn = extern "C" fn(u64) -> u64;

core::arch::global_asm!(
    r#"
    .pushsection .text.user, "ax"
    /* u64 user_enter(UserFn f [rdi], u64 arg [rsi], u64 user_rsp [rdx]) */
    .globl user_enter
user_enter:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, user_kernel_rsp(%rip)
    pushq ${user_ss}
    pushq %rdx
    pushq $0x2                      /* RFLAGS: IF=0, IOPL=0 */
    pushq ${user_cs}
    leaq user_trampoline(%rip), %rax
    pushq %rax
    xorl %eax, %eax
    xorl %ebx, %ebx
    xorl %ecx, %ecx
    xorl %edx, %edx
    xorl %ebp, %ebp
    iretq

    /* ring 3 */
user_trampoline:
    movq %rdi, %rax
    movq %rsi, %rdi
    callq *%rax
    int3
    ud2

    /* ring 0 via the DPL-3 gate (vector 3 of cpu.rs's IDT, which names this symbol), on IST2:
       drop the frame, back to user_enter's caller */
    .globl user_return_entry
user_return_entry:
    movq user_kernel_rsp(%rip), %rsp
    movl ${kernel_ds}, %ecx
    movl %ecx, %ds
    movl %ecx, %es
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    retq
    .popsection

    .pushsection .data.user, "aw"
    .balign 8
user_kernel_rsp:
    .quad 0
    .popsection
"#,
    user_ss = const USER_DS as u64,
    user_cs = const USER_CS as u64,
    kernel_ds = const KERNEL_DS as u32,
    options(att_syntax)
);

unsafe extern "C" {
    fn user_enter(f: UserFn, arg: u64, user_rsp: u64) -> u64;
}

/// Runs `f(arg)` in ring 3 and returns its result. BSP only (one shared user stack); needs
/// `cpu::init` (GDT user segments, TSS, IDT return gate).
pub fn run(f: UserFn, arg: u64) -> u64 {
    // From ring 3, `iretq` to ring 3 would be legal and would restart the one user stack under
    // the running code: refuse (a panic there comes back to the outer `run`, see below).
    assert!(current_ring() == 0, "user::run called from ring 3");
    let top = (&raw mut USER_STACK as u64 + USER_STACK_SIZE as u64) & !0xf;
    // SAFETY: cpu::init loaded the IDT with the return gate; the user stack is unused (we are
    // in ring 0, checked above), mapped user-accessible (all identity mappings have U=1) and
    // 16-byte aligned; user_enter saves and restores all callee-saved registers and the
    // kernel RSP.
    let result = unsafe { user_enter(f, arg, top) };
    if let Some(message) = RING3_PANIC.lock().take() {
        panic!("in ring 3: {message}");
    }
    result
}

/// A panic message from ring 3, which cannot print (no port I/O at IOPL 0): [`panicked`]
/// keeps it and [`run`] panics with it back in ring 0.
static RING3_PANIC: Spinlock<PanicText> = Spinlock::new(PanicText {
    bytes: [0; 256],
    len: None,
});

struct PanicText {
    bytes: [u8; 256],
    /// Bytes kept, once a panic happened.
    len: Option<usize>,
}

impl PanicText {
    fn take(&mut self) -> Option<String> {
        let len = self.len.take()?;
        Some(String::from_utf8_lossy(&self.bytes[..len]).into_owned())
    }
}

impl core::fmt::Write for PanicText {
    /// Keeps what fits; the rest of a long message is cut.
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let len = self.len.get_or_insert(0);
        let n = s.len().min(self.bytes.len() - *len);
        self.bytes[*len..*len + n].copy_from_slice(&s.as_bytes()[..n]);
        *len += n;
        Ok(())
    }
}

/// The panic handler's path in ring 3: keeps the message and ends the run early with `int3`.
pub fn panicked(info: &core::panic::PanicInfo<'_>) -> ! {
    if let Some(mut text) = RING3_PANIC.try_lock() {
        let _ = core::fmt::Write::write_fmt(&mut *text, format_args!("{info}"));
    }
    loop {
        // SAFETY: `int3` from ring 3 takes the return gate back to `run`'s caller in ring 0;
        // nothing in ring 3 runs after it.
        unsafe { core::arch::asm!("int3", options(nomem, nostack)) };
    }
}

/// Runs the closure `f` in ring 3 and returns what it returns. On PVM hosts ring-0 code is
/// emulated at microseconds an instruction while ring 3 runs natively, so the pure computation
/// a check does at start-up (parsing, table walks, building tables in memory) costs a few dozen
/// emulated instructions for the round trip instead of hundreds.
///
/// `f` must only compute on memory: port I/O and privileged instructions fault in ring 3
/// (the exception handler reports them and halts), and MMIO would still be emulated. A panic
/// in `f` (or a nested [`run`]/`call`, which panics) is reported from ring 0 by [`run`].
pub fn call<F: FnOnce() -> R, R>(f: F) -> R {
    struct Job<F, R> {
        f: Option<F>,
        out: Option<R>,
    }
    extern "C" fn trampoline<F: FnOnce() -> R, R>(job: u64) -> u64 {
        // SAFETY: `job` is the address of the `Job` that `call` below keeps alive (and does not
        // touch) until `run` returns; nothing else refers to it meanwhile.
        let job = unsafe { &mut *(job as *mut Job<F, R>) };
        if let Some(f) = job.f.take() {
            job.out = Some(f());
        }
        0
    }
    let mut job = Job {
        f: Some(f),
        out: None,
    };
    run(trampoline::<F, R>, &raw mut job as u64);
    match job.out {
        Some(out) => out,
        // Only if ring 3 ended early with `int3` without panicking, which no closure does.
        None => panic!("ring-3 call returned without a result"),
    }
}

/// Current privilege level (CS.RPL); callable from ring 3.
pub fn current_ring() -> u64 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe {
        core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags))
    };
    (cs & 3) as u64
}
