//! `hyperpool serve`: the pool daemon, with this same binary as each VM's VMM.

use std::time::Duration;

use hyperpool_daemon::{DaemonConfig, serve};

use crate::Failure;
use crate::cli::ServeArgs;

pub fn run(args: ServeArgs) -> Result<u8, Failure> {
    let tcp = match (args.listen, &args.token_file) {
        (Some(addr), Some(file)) => {
            let token = std::fs::read_to_string(file)
                .map_err(|e| Failure::usage(format!("--token-file {}: {e}", file.display())))?
                .trim()
                .to_string();
            if token.len() < 16 {
                return Err(Failure::usage(format!(
                    "--token-file {}: the token must be at least 16 characters",
                    file.display()
                )));
            }
            Some((addr, token))
        }
        _ => None,
    };
    let vmm_binary = std::env::current_exe()
        .map_err(|e| Failure::runtime(format!("finding this program's path: {e}")))?;
    serve(DaemonConfig {
        socket: args.socket,
        state_dir: args.state_dir,
        tcp,
        vmm_binary,
        cpu_overcommit: args.cpu_overcommit,
        memory_overcommit: args.memory_overcommit,
        stop_timeout: Duration::from_secs(args.stop_timeout),
    })
    .map(|()| 0)
    .map_err(|e| {
        if e.usage {
            Failure::usage(e.message)
        } else {
            Failure::runtime(e.message)
        }
    })
}
