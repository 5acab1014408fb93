//! `hyperpool console NAME`: the VM's serial console on this terminal, until Ctrl-] (or the VM
//! ends). The terminal is raw while attached and restored on every way out.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use hyperpool_vmm::serial_io;

use crate::Failure;
use crate::cli::VmRef;
use crate::cmd_pool;

/// Ctrl-]: telnet's escape, as virsh console uses it.
const DETACH: u8 = 0x1d;

pub fn run(vm: VmRef) -> Result<u8, Failure> {
    let path = cmd_pool::console_socket(&vm)?;
    let stream = UnixStream::connect(&path)
        .map_err(|e| Failure::runtime(format!("console of {}: {e}", vm.name)))?;
    let mut from_vm = stream
        .try_clone()
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let raw = serial_io::RawTerminal::enter();
    if raw.is_some() {
        eprint!("attached to {} (detach with Ctrl-])\r\n", vm.name);
    }
    std::thread::Builder::new()
        .name("console-out".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            let mut out = std::io::stdout();
            while let Ok(n @ 1..) = from_vm.read(&mut buf) {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
            // The VM (or its console) went away: end the attach too.
            serial_io::restore_terminal();
            std::process::exit(0);
        })
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let mut to_vm = stream;
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 256];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let (send, detach) = match chunk.iter().position(|&b| b == DETACH) {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        if to_vm.write_all(send).is_err() || detach {
            break;
        }
    }
    drop(raw);
    serial_io::restore_terminal();
    Ok(0)
}
