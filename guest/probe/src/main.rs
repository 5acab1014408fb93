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
mod check;
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

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use check::Check;
use cmdline::Options;
use pvh::StartInfo;

/// Ring-3 benchmark loop length.
const RING3_ITERS: u64 = 100_000_000;

/// What the start-up work in ring 3 hands back to ring 0.
struct Plan {
    si: StartInfo,
    cmdline: &'static str,
    opts: Options<'static>,
    /// The selected checks in order, each with its name (`None`: no check by that name).
    checks: Vec<(&'static str, Option<Check>)>,
}

/// Reads the VMM's hand-off and the command line. Pure computation on memory, so it runs in
/// ring 3 (see `user::call`): on PVM hosts this is most of a start's instructions otherwise.
fn plan(start_info_paddr: u64) -> Result<Box<Plan>, String> {
    heap::init();
    // SAFETY: EBX at PVH entry points at hvm_start_info (identity mapped, below 4 GiB).
    let si = unsafe { StartInfo::read(start_info_paddr) };
    if si.magic != pvh::START_MAGIC {
        return Err(format!("bad hvm_start_info magic {:#x}", si.magic));
    }
    // SAFETY: cmdline_paddr is 0 or a NUL-terminated string placed by the VMM.
    let cmdline = unsafe { cmdline::read(si.cmdline_paddr) };
    let opts = Options::parse(cmdline);
    let checks = opts.check_names().map(|n| (n, Check::parse(n))).collect();
    // Boxed: moving the plan out of `user::call` by value is itself dozens of emulated moves.
    Ok(Box::new(Plan {
        si,
        cmdline,
        opts,
        checks,
    }))
}

/// Called by `boot.rs` in long mode with the physical address of `hvm_start_info`.
pub extern "C" fn main_entry(start_info_paddr: u64) -> ! {
    cpu::init();
    serial::init();
    let plan = match user::call(|| plan(start_info_paddr)) {
        Ok(plan) => plan,
        Err(why) => {
            println!("PROBE start FAIL {why}");
            end::halt_forever();
        }
    };
    if let Some(bad) = plan.opts.bad_end {
        println!("PROBE probe.end FAIL unknown action '{bad}', using poweroff");
    }

    for &(name, check) in &plan.checks {
        let result = match check {
            Some(check) => run_check(check, &plan.si, start_info_paddr, plan.cmdline),
            None => Err("unknown check".into()),
        };
        match result {
            Ok(figures) => println!("PROBE {name} ok {figures}"),
            Err(why) => println!("PROBE {name} FAIL {why}"),
        }
    }
    println!("PROBE done");
    end::finish(plan.opts.end, plan.si.rsdp_paddr)
}

fn run_check(check: Check, si: &StartInfo, si_paddr: u64, cmdline: &str) -> Result<String, String> {
    match check {
        Check::Cmdline => Ok(cmdline.into()),
        Check::Mem => mem::check(si, si_paddr),
        Check::Acpi => acpi::check(si.rsdp_paddr),
        Check::Cpus => smp::check(si.rsdp_paddr),
        Check::Ring3 => ring3_check(),
        Check::Pci => pci::check(si.rsdp_paddr),
        Check::Rng => virtio::rng_check(si.rsdp_paddr),
        Check::Blk => blk::check(si.rsdp_paddr),
        Check::Vsock => vsock::check(si.rsdp_paddr),
        Check::Net => net::check(si.rsdp_paddr),
        Check::VsockListen => vsock::listen_check(si.rsdp_paddr),
        Check::Console => console::check(si.rsdp_paddr),
        Check::Intx => intx::check(si.rsdp_paddr),
        Check::Idle => idle::run(si.rsdp_paddr),
        Check::Hotplug => hotplug::run(si.rsdp_paddr),
        Check::StrayIrq => apic::stray_irq_check(),
        Check::BenchBlk => bench_blk::check(si, si_paddr, cmdline),
        Check::BenchNet => bench_net::check(si, si_paddr, cmdline),
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
    if user::current_ring() == 3 {
        user::panicked(info);
    }
    serial::print_fmt_emergency(format_args!("PROBE panic {info}\n"));
    end::halt_forever()
}

/// The precompiled `alloc` references the unwinder even with `panic = "abort"`; it is never
/// called because nothing unwinds.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    end::halt_forever()
}
