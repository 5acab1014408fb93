//! What the host offers: /dev/kvm, its limits, and its memory.

use std::path::Path;
use std::sync::{Once, OnceLock};

use kvm_ioctls::{Cap, Kvm};

use crate::arch::cpu_template::CpuTemplate;
use crate::error::{Error, Result};

pub const KVM_PATH: &str = "/dev/kvm";

/// Opens /dev/kvm, with a message that says how to fix the usual failures.
pub fn open_kvm() -> Result<Kvm> {
    let path = Path::new(KVM_PATH);
    if !path.exists() {
        return Err(Error::KvmUnavailable(format!(
            "{KVM_PATH} does not exist: this host has no KVM; load kvm_intel, kvm_amd or kvm_pvm, or enable virtualization"
        )));
    }
    let kvm = Kvm::new_with_path(c"/dev/kvm").map_err(|e| {
        Error::KvmUnavailable(match e.errno() {
            libc::EACCES | libc::EPERM => {
                format!("{KVM_PATH} is not readable and writable by this user: run as root or join the 'kvm' group")
            }
            _ => format!("{KVM_PATH} cannot be opened: {e}"),
        })
    })?;
    if kvm.get_api_version() != 12 {
        return Err(Error::KvmUnavailable(format!(
            "{KVM_PATH} speaks KVM API version {}, not 12",
            kvm.get_api_version()
        )));
    }
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::UserMemory, "user memory"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Pit2, "in-kernel PIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmUnavailable(format!(
                "{KVM_PATH} lacks the {name} capability this VMM needs"
            )));
        }
    }
    report_pvm_once();
    Ok(kvm)
}

/// The most vCPUs one VM may have on this host.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    kvm.get_max_vcpus() as u32
}

/// Total host RAM in bytes (MemTotal), from sysinfo(2): every VM start asks, and the kernel
/// builds all of /proc/meminfo for each read of it.
pub fn host_memory() -> Option<u64> {
    let mut info = std::mem::MaybeUninit::<libc::sysinfo>::zeroed();
    // SAFETY: sysinfo fills the struct it is given; it is zeroed, so fully initialised either way.
    let info = unsafe {
        if libc::sysinfo(info.as_mut_ptr()) != 0 {
            return None;
        }
        info.assume_init()
    };
    info.totalram.checked_mul(u64::from(info.mem_unit))
}

/// True when /dev/kvm is PVM (software nested virtualization, ring 0 emulated). Looked up
/// once per process: a start asks several times, and each sysfs lookup is a path walk.
pub fn is_pvm() -> bool {
    static PVM: OnceLock<bool> = OnceLock::new();
    *PVM.get_or_init(|| Path::new("/sys/module/kvm_pvm").exists())
}

/// The CPU template a VM gets: the one given, else this host's default.
pub fn cpu_template(given: Option<&CpuTemplate>) -> CpuTemplate {
    given
        .cloned()
        .unwrap_or_else(|| CpuTemplate::host_default(is_pvm()))
}

/// Says once per process, at start, that the host is PVM and what that means for guests.
fn report_pvm_once() {
    static REPORTED: Once = Once::new();
    if is_pvm() {
        REPORTED.call_once(|| {
            tracing::info!(
                "this host's KVM is PVM (module kvm_pvm): guest kernel code runs in the host's \
                 instruction emulator (slow); VMs hide {} from the guest unless --cpus \
                 features=... (or features=none) says otherwise, and the VMM completes the \
                 instructions the emulator gives up on",
                CpuTemplate::host_default(true)
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_matches_meminfo() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert_eq!(host_memory(), Some(kib * 1024));
    }
}
