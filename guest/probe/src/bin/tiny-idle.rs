//! `tiny-idle`: the smallest useful PVH guest. Marks port 0x440, prints `hyperpool-tiny\n` on
//! COM1, then idles in `cli; hlt` forever.

#![no_std]
#![no_main]

core::arch::global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    movw $0x440, %dx
    outb %al, %dx
    movw $0x3f8, %dx
    /* "hyperpool-tiny\n", unrolled: no loop, no data */
    .irp c, 104,121,112,101,114,112,111,111,108,45,116,105,110,121,10
    movb $\c, %al
    outb %al, %dx
    .endr
1:  cli
    hlt
    jmp 1b
    .popsection
"#,
    options(att_syntax)
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
