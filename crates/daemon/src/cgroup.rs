//! A cgroup per VM (`hyperpool/<name>`): the VMM process and all its threads go in, with the
//! VM's CPU weight, CPU cap and a memory limit (guest memory plus room for the VMM). cgroup v2
//! where the host has it, v1 otherwise (cgroups-rs hides the difference).
//!
//! Only the controllers the VM's limits use are joined (cpu, memory, and cpuset when pinned):
//! on v1 each one is a separate hierarchy, and every move of a process between cgroups takes
//! the kernel's global cgroup lock and waits out an RCU grace period, so joining all of them
//! (nine on a typical host) made moving the VMM the slowest step of a start.

use std::sync::LazyLock;

use cgroups_rs::CgroupPid;
use cgroups_rs::fs::cgroup_builder::CgroupBuilder;
use cgroups_rs::fs::{Cgroup, Hierarchy, hierarchies};
use hyperpool_api::pool::VmSpec;

/// Room above guest memory for the VMM itself (its text, device buffers, io_uring rings).
const VMM_OVERHEAD_MIB: u64 = 64;
const CPU_PERIOD_US: u64 = 100_000;
const DEFAULT_WEIGHT: u64 = 100;

pub struct VmCgroup;

/// The host's cgroup hierarchies, found once: finding them parses /proc/self/mountinfo, which
/// the kernel formats anew for every read (a measurable share of a start's CPU on a busy pool).
enum Hierarchies {
    V1(hierarchies::V1),
    V2(hierarchies::V2),
}

static HIERARCHIES: LazyLock<Hierarchies> = LazyLock::new(|| {
    if hierarchies::is_cgroup2_unified_mode() {
        Hierarchies::V2(hierarchies::V2::new())
    } else {
        Hierarchies::V1(hierarchies::V1::new())
    }
});

fn hierarchy() -> Box<dyn Hierarchy> {
    match &*HIERARCHIES {
        Hierarchies::V1(h) => Box::new(h.clone()),
        Hierarchies::V2(h) => Box::new(h.clone()),
    }
}

pub fn path(name: &str) -> String {
    format!("hyperpool/{name}")
}

/// cgroup v1 `cpu.shares` for a v2-style weight (v1's default 1024 = weight 100).
fn shares(weight: u64) -> u64 {
    (weight * 1024 / DEFAULT_WEIGHT).max(2)
}

impl VmCgroup {
    /// Creates (or reuses) the VM's cgroup and puts `pid` (the VMM, with all its threads) in it.
    pub fn place(spec: &VmSpec, pid: u32) -> Result<(), String> {
        let placement = spec.placement.clone().unwrap_or_default();
        let weight = placement.cpu_weight.unwrap_or(DEFAULT_WEIGHT);
        let hierarchy = hierarchy();
        let mut controllers = vec!["cpu".to_string(), "memory".to_string()];
        if placement.pin_cores.is_some() {
            controllers.push("cpuset".into());
        }
        let mut cpu = CgroupBuilder::new(&path(&spec.name))
            .set_specified_controllers(controllers)
            .memory()
            .memory_hard_limit(((spec.memory_mib + VMM_OVERHEAD_MIB) << 20) as i64)
            .done()
            .cpu()
            .shares(shares(weight));
        if let Some(max) = placement.cpu_max {
            cpu = cpu
                .period(CPU_PERIOD_US)
                .quota((max * CPU_PERIOD_US as f64) as i64);
        }
        if let Some(cores) = &placement.pin_cores {
            let list: Vec<String> = cores.iter().map(usize::to_string).collect();
            cpu = cpu.cpus(list.join(","));
        }
        let cgroup = cpu
            .done()
            .build(hierarchy)
            .map_err(|e| format!("creating cgroup {}: {e}", path(&spec.name)))?;
        cgroup
            .add_task_by_tgid(CgroupPid::from(u64::from(pid)))
            .map_err(|e| format!("moving VMM {pid} into cgroup {}: {e}", path(&spec.name)))?;
        Ok(())
    }

    /// Removes the cgroup of a VM whose VMM has ended (nothing may still be in it), in every
    /// hierarchy (daemons before this one joined them all).
    pub fn remove(name: &str) {
        let cgroup = Cgroup::load(hierarchy(), path(name).as_str());
        if let Err(e) = cgroup.delete() {
            tracing::debug!("removing cgroup {}: {e}", path(name));
        }
    }
}
