//! The host's capacity and admission control: a VM is admitted only if the vCPUs and memory
//! already given to running VMs plus its own fit the host times the overcommit ratios.

use hyperpool_api::pool::{PoolInfo, VmRecord, VmSpec, VmStatus};

pub fn host_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// MemTotal from /proc/meminfo, MiB.
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// (total, free) bytes of the filesystem holding `path`.
pub fn disk_space(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is a valid out-pointer for one statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return (0, 0);
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    let frag = st.f_frsize;
    (st.f_blocks * frag, st.f_bavail * frag)
}

/// What the VMs that hold resources have been given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl<'a> FromIterator<&'a VmSpec> for Usage {
    fn from_iter<I: IntoIterator<Item = &'a VmSpec>>(specs: I) -> Self {
        specs.into_iter().fold(Self::default(), |u, s| Self {
            vms: u.vms + 1,
            vcpus: u.vcpus + s.cpus,
            memory_mib: u.memory_mib + s.memory_mib,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub cores: u32,
    pub memory_mib: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
}

impl Capacity {
    pub fn of_host(cpu_overcommit: f64, memory_overcommit: f64) -> Self {
        Self {
            cores: host_cores(),
            memory_mib: host_memory_mib(),
            cpu_overcommit,
            memory_overcommit,
        }
    }

    fn vcpu_limit(&self) -> u32 {
        (f64::from(self.cores) * self.cpu_overcommit).floor() as u32
    }

    fn memory_limit(&self) -> u64 {
        (self.memory_mib as f64 * self.memory_overcommit).floor() as u64
    }

    /// Figures for `GET /v1/pool`: `used` by the VMs holding resources, of `vms` in all.
    pub fn info(&self, used: Usage, vms: u32, disk: (u64, u64)) -> PoolInfo {
        let (vcpus, memory) = (used.vcpus, used.memory_mib);
        PoolInfo {
            host_cores: self.cores,
            host_memory_mib: self.memory_mib,
            disk_total_bytes: disk.0,
            disk_free_bytes: disk.1,
            cpu_overcommit: self.cpu_overcommit,
            memory_overcommit: self.memory_overcommit,
            allocated_vcpus: vcpus,
            allocated_memory_mib: memory,
            free_vcpus: self.vcpu_limit().saturating_sub(vcpus),
            free_memory_mib: self.memory_limit().saturating_sub(memory),
            vms,
            running: used.vms,
        }
    }

    /// Whether a VM with `spec` may start next to the others' `used` (without its own share);
    /// the refusal has the numbers.
    pub fn admit(&self, used: Usage, spec: &VmSpec) -> Result<(), String> {
        let (vcpus, memory) = (used.vcpus, used.memory_mib);
        if vcpus + spec.cpus > self.vcpu_limit() {
            return Err(format!(
                "not enough CPU in the pool: {} vCPUs asked, {} of {} free ({} cores x overcommit {})",
                spec.cpus,
                self.vcpu_limit().saturating_sub(vcpus),
                self.vcpu_limit(),
                self.cores,
                self.cpu_overcommit
            ));
        }
        if memory + spec.memory_mib > self.memory_limit() {
            return Err(format!(
                "not enough memory in the pool: {} MiB asked, {} of {} MiB free ({} MiB x overcommit {})",
                spec.memory_mib,
                self.memory_limit().saturating_sub(memory),
                self.memory_limit(),
                self.memory_mib,
                self.memory_overcommit
            ));
        }
        Ok(())
    }
}

pub fn holds_resources(r: &VmRecord) -> bool {
    matches!(r.status, VmStatus::Running | VmStatus::Paused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperpool_api::pool::VmSpec;

    fn vm(name: &str, cpus: u32, mib: u64, status: VmStatus) -> VmRecord {
        VmRecord {
            spec: VmSpec {
                name: name.into(),
                cpus,
                memory_mib: mib,
                ..VmSpec::default()
            },
            status,
            pid: None,
            started_at_ms: None,
            last_exit: None,
            restarts: 0,
        }
    }

    #[test]
    fn admission_counts_what_running_vms_hold_and_applies_overcommit() {
        let cap = Capacity {
            cores: 2,
            memory_mib: 1000,
            cpu_overcommit: 2.0,
            memory_overcommit: 1.0,
        };
        let records = [
            vm("a", 2, 400, VmStatus::Running),
            vm("b", 1, 300, VmStatus::Paused),
            vm("c", 8, 8000, VmStatus::Stopped),
        ];
        let used: Usage = records
            .iter()
            .filter(|r| holds_resources(r))
            .map(|r| &r.spec)
            .collect();
        assert_eq!(
            used,
            Usage {
                vms: 2,
                vcpus: 3,
                memory_mib: 700
            }
        );
        assert!(
            cap.admit(used, &vm("d", 1, 300, VmStatus::Stopped).spec)
                .is_ok()
        );
        let e = cap
            .admit(used, &vm("d", 2, 100, VmStatus::Stopped).spec)
            .unwrap_err();
        assert!(e.contains("2 vCPUs asked, 1 of 4 free"), "{e}");
        let e = cap
            .admit(used, &vm("d", 1, 301, VmStatus::Stopped).spec)
            .unwrap_err();
        assert!(e.contains("301 MiB asked, 300 of 1000 MiB free"), "{e}");
        let info = cap.info(used, records.len() as u32, (10, 5));
        assert_eq!((info.allocated_vcpus, info.free_vcpus), (3, 1));
        assert_eq!(
            (info.allocated_memory_mib, info.free_memory_mib),
            (700, 300)
        );
        assert_eq!((info.vms, info.running), (3, 2));
    }
}
