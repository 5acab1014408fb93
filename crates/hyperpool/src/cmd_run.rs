//! `hyperpool run`: one VM in the foreground.

use std::time::Instant;

use hyperpool_vmm::config::OnReboot;
use hyperpool_vmm::run::Outcome;
use hyperpool_vmm::{VmConfig, serial_io};

use crate::Failure;
use crate::cli::{OnRebootArg, RunArgs};

pub fn config(args: RunArgs) -> VmConfig {
    VmConfig {
        kernel: args.kernel,
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory: args.memory,
        serial: args.serial,
        console: args.console,
        on_reboot: match args.on_reboot {
            OnRebootArg::Exit => OnReboot::Exit,
            OnRebootArg::Restart => OnReboot::Restart,
        },
        dump_acpi: args.dump_acpi,
        rng: args.rng,
        device_processes: args.device_processes,
        vsock: args.vsock,
        disks: args.disks,
        nets: args.nets,
    }
}

pub fn run(args: RunArgs, start: Instant) -> Result<u8, Failure> {
    let cfg = config(args);
    let result = hyperpool_vmm::run(&cfg, start);
    hyperpool_vmm::device_processes::stop_all();
    // The terminal must be usable before anything below prints.
    serial_io::restore_terminal();
    match result {
        Ok(outcome) => {
            match &outcome {
                Outcome::GuestFatal(why) => eprintln!("hyperpool: the guest crashed: {why}"),
                Outcome::Signal(sig) => tracing::info!("stopped by signal {sig}"),
                Outcome::DebugExit(v) => {
                    tracing::info!("guest wrote {v:#x} to the debug-exit port")
                }
                Outcome::Poweroff => tracing::info!("guest powered off"),
                Outcome::Reset => tracing::info!("guest reset"),
                Outcome::Stopped => tracing::info!("stopped"),
            }
            Ok(outcome.exit_code() as u8)
        }
        Err(e) if e.is_user_error() => Err(Failure::usage(e.to_string())),
        Err(e) => Err(Failure::runtime(e.to_string())),
    }
}
