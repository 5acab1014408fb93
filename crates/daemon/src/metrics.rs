//! The Prometheus text exposition of the pool and its VMs (`GET /metrics`).

use std::fmt::Write;

use hyperpool_api::pool::{PoolInfo, VmRecord, VmStatus};

const STATUSES: [(VmStatus, &str); 4] = [
    (VmStatus::Stopped, "stopped"),
    (VmStatus::Running, "running"),
    (VmStatus::Paused, "paused"),
    (VmStatus::Crashed, "crashed"),
];

/// `figures` holds, per VM name, the VMM's (CPU ms, RSS bytes) while it runs.
pub fn render(
    pool: &PoolInfo,
    vms: &[VmRecord],
    figures: &[(String, Option<(u64, u64)>)],
) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    gauge(
        "hyperpool_host_cores",
        "Host CPU cores.",
        &one(f64::from(pool.host_cores)),
    );
    gauge(
        "hyperpool_host_memory_bytes",
        "Host memory.",
        &one((pool.host_memory_mib << 20) as f64),
    );
    gauge(
        "hyperpool_allocated_vcpus",
        "vCPUs of running and paused VMs.",
        &one(f64::from(pool.allocated_vcpus)),
    );
    gauge(
        "hyperpool_allocated_memory_bytes",
        "Guest memory of running and paused VMs.",
        &one((pool.allocated_memory_mib << 20) as f64),
    );
    gauge(
        "hyperpool_free_vcpus",
        "vCPUs a new VM may still get (with overcommit).",
        &one(f64::from(pool.free_vcpus)),
    );
    gauge(
        "hyperpool_free_memory_bytes",
        "Memory a new VM may still get (with overcommit).",
        &one((pool.free_memory_mib << 20) as f64),
    );
    gauge(
        "hyperpool_disk_free_bytes",
        "Free space under the state directory.",
        &one(pool.disk_free_bytes as f64),
    );
    let by_status: Vec<(String, f64)> = STATUSES
        .iter()
        .map(|(s, label)| {
            let n = vms.iter().filter(|v| v.status == *s).count();
            (format!("{{status=\"{label}\"}}"), n as f64)
        })
        .collect();
    gauge("hyperpool_vms", "VMs by status.", &by_status);
    let label = |name: &str| format!("{{vm=\"{name}\"}}");
    let per_vm = |f: &dyn Fn(&VmRecord) -> f64| -> Vec<(String, f64)> {
        vms.iter().map(|v| (label(&v.spec.name), f(v))).collect()
    };
    gauge(
        "hyperpool_vm_up",
        "1 while the VM's VMM runs.",
        &per_vm(&|v| {
            f64::from(u8::from(matches!(
                v.status,
                VmStatus::Running | VmStatus::Paused
            )))
        }),
    );
    gauge(
        "hyperpool_vm_vcpus",
        "vCPUs given to the VM.",
        &per_vm(&|v| f64::from(v.spec.cpus)),
    );
    gauge(
        "hyperpool_vm_memory_bytes",
        "Guest memory given to the VM.",
        &per_vm(&|v| (v.spec.memory_mib << 20) as f64),
    );
    gauge(
        "hyperpool_vm_restarts",
        "Restarts by the VM's policy.",
        &per_vm(&|v| f64::from(v.restarts)),
    );
    let running: Vec<&(String, Option<(u64, u64)>)> =
        figures.iter().filter(|(_, f)| f.is_some()).collect();
    gauge(
        "hyperpool_vm_cpu_seconds",
        "CPU time of the VM's VMM process.",
        &running
            .iter()
            .filter_map(|(n, f)| f.map(|(ms, _)| (label(n), ms as f64 / 1000.0)))
            .collect::<Vec<_>>(),
    );
    gauge(
        "hyperpool_vm_vmm_rss_bytes",
        "Resident memory of the VM's VMM process (guest memory included).",
        &running
            .iter()
            .filter_map(|(n, f)| f.map(|(_, rss)| (label(n), rss as f64)))
            .collect::<Vec<_>>(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperpool_api::pool::VmSpec;

    #[test]
    fn every_sample_line_parses_as_name_labels_value() {
        let pool = PoolInfo {
            host_cores: 2,
            host_memory_mib: 1024,
            disk_total_bytes: 10,
            disk_free_bytes: 5,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            allocated_vcpus: 1,
            allocated_memory_mib: 64,
            free_vcpus: 7,
            free_memory_mib: 960,
            vms: 2,
            running: 1,
        };
        let vm = |name: &str, status| VmRecord {
            spec: VmSpec {
                name: name.into(),
                cpus: 1,
                memory_mib: 64,
                ..VmSpec::default()
            },
            status,
            pid: None,
            started_at_ms: None,
            last_exit: None,
            restarts: 0,
        };
        let vms = [vm("a", VmStatus::Running), vm("b", VmStatus::Crashed)];
        let text = render(
            &pool,
            &vms,
            &[("a".into(), Some((1500, 4096))), ("b".into(), None)],
        );
        assert!(
            text.contains("hyperpool_vms{status=\"crashed\"} 1"),
            "{text}"
        );
        assert!(text.contains("hyperpool_vm_up{vm=\"a\"} 1"), "{text}");
        assert!(
            text.contains("hyperpool_vm_cpu_seconds{vm=\"a\"} 1.5"),
            "{text}"
        );
        assert!(
            !text.contains("hyperpool_vm_cpu_seconds{vm=\"b\"}"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(line.starts_with("hyperpool_"), "{line}");
        }
    }
}
