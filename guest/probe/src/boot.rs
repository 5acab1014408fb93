//! PVH entry: 32-bit protected mode → long mode → `probe_main`.
//!
//! Everything here runs in (emulated) ring 0, so it is kept to a few dozen instructions:
//! the page tables are prebuilt in `.data` (see `paging.rs`), only the small `.bss` is zeroed.

use crate::main_entry;

core::arch::global_asm!(
    r#"
    /* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", 4-byte 32-bit entry address. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
    .popsection

    .pushsection .text.boot, "ax", @progbits
    .code32
    .globl pvh_start32
pvh_start32:
    /* Boot-timer mark (any byte to port 0x440), then the start line on COM1. */
    movw $0x440, %dx
    outb %al, %dx
    movl %ebx, %edi                     /* struct hvm_start_info * */
    cld
    movl $boot_start_msg, %esi
    movl $boot_start_msg_end - boot_start_msg, %ecx
    movw $0x3f8, %dx
    rep outsb                           /* one emulated instruction, not a loop */

    lgdtl probe_gdt_ptr                 /* cpu.rs: the probe's final GDT */
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax                    /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $0xC0000080, %ecx              /* EFER */
    rdmsr
    orl $0x101, %eax                    /* LME | SCE */
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFF3, %eax              /* clear EM, TS */
    orl $0x80000023, %eax               /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmpl $0x08, $2f

    .code64
2:  movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movq $boot_stack_top, %rsp
    movl %edi, %edx                     /* zero-extended start_info pointer */
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    rep stosq
    movl %edx, %edi
    fninit
    call {main}
3:  cli
    hlt
    jmp 3b
    .popsection

    .pushsection .rodata.boot_msg, "a"
boot_start_msg:
    .ascii "hyperpool-probe: start\n"
boot_start_msg_end:
    .popsection

    .pushsection .bss.noinit.boot_stack, "aw", @nobits
    .balign 4096
    .skip 65536
    .globl boot_stack_top
boot_stack_top:
    .popsection
"#,
    main = sym main_entry,
    options(att_syntax)
);
