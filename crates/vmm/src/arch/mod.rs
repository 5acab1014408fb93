//! x86_64 machine definition: where things live in guest memory, the CPU state guests boot
//! with, and the boot protocols that hand a kernel its memory map and command line.

pub mod boot;
pub mod cpu_template;
pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod msr;
pub mod paging;
pub mod regs;
