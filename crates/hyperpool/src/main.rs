//! `hyperpool`: the hypervisor's one binary.

mod cli;
mod cmd_console;
mod cmd_device;
mod cmd_guest;
mod cmd_pool;
mod cmd_run;
mod cmd_serve;
mod cmd_vmm;
mod fd_stream;
mod sandbox;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

/// Exit status for input the user must fix.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let start = Instant::now();
    if cli::VmmCli::applies() {
        return match cli::VmmCli::try_parse() {
            Ok(cli::VmmCli {
                verbose,
                command: cli::VmmOnly::Vmm(args),
            }) => {
                init_logging(verbose);
                finish(cmd_vmm::run(args, start))
            }
            Err(e) => usage_error(e),
        };
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(cli.verbose);
    let result = match cli.command {
        cli::Command::Run(args) => cmd_run::run(*args, start),
        cli::Command::Vmm(args) => cmd_vmm::run(args, start),
        cli::Command::Serve(args) => cmd_serve::run(args),
        cli::Command::Create(args) => cmd_pool::create(*args),
        cli::Command::Start(vm) => cmd_pool::lifecycle("start", vm),
        cli::Command::Stop(vm) => cmd_pool::lifecycle("stop", vm),
        cli::Command::Kill(vm) => cmd_pool::lifecycle("kill", vm),
        cli::Command::Pause(vm) => cmd_pool::lifecycle("pause", vm),
        cli::Command::Resume(vm) => cmd_pool::lifecycle("resume", vm),
        cli::Command::Restart(vm) => cmd_pool::lifecycle("restart", vm),
        cli::Command::Rm(vm) => cmd_pool::rm(vm),
        cli::Command::Ls(args) => cmd_pool::ls(args),
        cli::Command::Inspect(vm) => cmd_pool::inspect(vm),
        cli::Command::Console(vm) => cmd_console::run(vm),
        cli::Command::Logs(args) => cmd_pool::logs(args),
        cli::Command::Pool(args) => cmd_pool::pool(args),
        cli::Command::Guest(args) => cmd_guest::run(args),
        cli::Command::Device(args) => cmd_device::run(args),
    };
    finish(result)
}

fn finish(result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("hyperpool: error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

/// Help and version go to stdout in full; a usage mistake is one line on stderr and exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let rendered = e.render().to_string();
    let line = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    eprintln!("hyperpool: error: {line} (see 'hyperpool --help')");
    ExitCode::from(EXIT_USAGE)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HYPERPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

/// A failed command: what to print and the exit status.
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_USAGE,
        }
    }

    pub fn runtime(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }
}
