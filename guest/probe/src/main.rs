//! hyperpool-probe: a bare-metal guest that checks what the VMM provides (CPUs, memory map,
//! ACPI, ring-3 execution, PCI, virtio devices), benchmarks its virtio-blk and virtio-net, and
//! reports one `PROBE <check> ok|FAIL ...` line per check on COM1. See `README.md`.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod apic;
mod arena;
mod bench_blk;
mod bench_net;
mod blk;
mod boot;
mod builtins;
mod cmdline;
mod console;
mod cpu;
mod end;
mod heap;
mod hotplug;
mod idle;
mod intx;
mod mem;
mod net;
mod paging;
mod pci;
mod pvh;
mod sdt;
mod serial;
mod smp;
mod time;
mod user;
mod virtio;
mod vring;
mod vsock;

use alloc::format;
use alloc::string::String;
use cmdline::Options;
use pvh::StartInfo;

/// Ring-3 benchmark loop length.
const RING3_ITERS: u64 = 100_000_000;

/// Called by `boot.rs` in long mode with the physical address of `hvm_start_info`.
pub extern "C" fn main_entry(start_info_paddr: u64) -> ! {
    heap::init();
    serial::init();
    cpu::init();

    // SAFETY: EBX at PVH entry points at hvm_start_info (identity mapped, below 4 GiB).
    let si = unsafe { StartInfo::read(start_info_paddr) };
    if si.magic != pvh::START_MAGIC {
        println!("PROBE start FAIL bad hvm_start_info magic {:#x}", si.magic);
        end::halt_forever();
    }
    // SAFETY: cmdline_paddr is 0 or a NUL-terminated string placed by the VMM.
    let cmdline = unsafe { cmdline::read(si.cmdline_paddr) };
    let opts = Options::parse(cmdline);
    if let Some(bad) = opts.bad_end {
        println!("PROBE probe.end FAIL unknown action '{bad}', using poweroff");
    }

    for name in opts.check_names() {
        let result = run_check(name, &si, start_info_paddr, cmdline);
        match result {
            Ok(figures) => println!("PROBE {name} ok {figures}"),
            Err(why) => println!("PROBE {name} FAIL {why}"),
        }
    }
    println!("PROBE done");
    end::finish(opts.end, si.rsdp_paddr)
}

fn run_check(name: &str, si: &StartInfo, si_paddr: u64, cmdline: &str) -> Result<String, String> {
    match name {
        "cmdline" => Ok(cmdline.into()),
        "mem" => mem::check(si, si_paddr),
        "acpi" => acpi::check(si.rsdp_paddr),
        "cpus" => smp::check(si.rsdp_paddr),
        "ring3" => ring3_check(),
        "pci" => pci::check(si.rsdp_paddr),
        "rng" => virtio::rng_check(si.rsdp_paddr),
        "blk" => blk::check(si.rsdp_paddr),
        "vsock" => vsock::check(si.rsdp_paddr),
        "net" => net::check(si.rsdp_paddr),
        "vsock-listen" => vsock::listen_check(si.rsdp_paddr),
        "console" => console::check(si.rsdp_paddr),
        "intx" => intx::check(si.rsdp_paddr),
        "idle" => idle::run(si.rsdp_paddr),
        "hotplug" => hotplug::run(si.rsdp_paddr),
        "stray-irq" => apic::stray_irq_check(),
        "bench-blk" => bench_blk::check(si, si_paddr, cmdline),
        "bench-net" => bench_net::check(si, si_paddr, cmdline),
        _ => Err("unknown check".into()),
    }
}

extern "C" fn ring3_loop(iters: u64) -> u64 {
    let ring = user::current_ring();
    // SAFETY: a register-only countdown loop.
    unsafe {
        core::arch::asm!("2:", "dec {0}", "jnz 2b", inout(reg) iters => _, options(nomem, nostack));
    }
    ring
}

fn ring3_check() -> Result<String, String> {
    let t0 = time::rdtsc();
    let ring = user::run(ring3_loop, RING3_ITERS);
    let ticks = time::rdtsc() - t0;
    if ring != 3 {
        return Err(format!("loop ran in ring {ring}"));
    }
    Ok(match time::ticks_to_ms(ticks) {
        Some(ms) => format!("iters={RING3_ITERS} ms={ms}"),
        None => format!("iters={RING3_ITERS} ms=? tsc_ticks={ticks}"),
    })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    serial::print_fmt_emergency(format_args!("PROBE panic {info}\n"));
    end::halt_forever()
}

/// The precompiled `alloc` references the unwinder even with `panic = "abort"`; it is never
/// called because nothing unwinds.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    end::halt_forever()
}
