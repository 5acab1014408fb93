//! `tiny-multiboot`: a Multiboot v1 kernel (no PVH note) that checks what the loader promised.
//!
//! Entered in 32-bit protected mode with EAX = 0x2BADB002 and EBX = the information structure.
//! It prints `hyperpool-tiny-multiboot\n` on COM1, then writes 0x10 to the debug-exit port
//! (exit status 33) when the magic is right and the info carries a memory map and a command line,
//! and 0x11 (exit status 35) otherwise. The header uses the address fields (the "a.out kludge"),
//! since Multiboot loaders do not take 64-bit ELF files by their program headers.

#![no_std]
#![no_main]

core::arch::global_asm!(
    r#"
    .pushsection .text.boot, "ax"
    .code32
    .balign 4
mb_header:
    .long 0x1badb002
    .long 0x00010000
    .long -(0x1badb002 + 0x00010000)
    .long mb_header
    .long __image_start
    .long mb_end
    .long 0
    .long mb_start32

    .globl mb_start32
mb_start32:
    movl %eax, %esi
    movw $0x3f8, %dx
    .irp c, 104,121,112,101,114,112,111,111,108,45,116,105,110,121,45,109,117,108,116,105,98,111,111,116,10
    movb $\c, %al
    outb %al, %dx
    .endr
    cmpl $0x2badb002, %esi
    jne 2f
    /* flags: bit 2 = command line, bit 6 = memory map */
    movl (%ebx), %ecx
    andl $0x44, %ecx
    cmpl $0x44, %ecx
    jne 2f
    movb $0x10, %al
    outb %al, $0xf4
    jmp 1f
2:  movb $0x11, %al
    outb %al, $0xf4
1:  cli
    hlt
    jmp 1b
mb_end:
    .popsection
"#,
    options(att_syntax)
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
