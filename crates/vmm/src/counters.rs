//! What the VM's vCPUs did, counted without locks on their hot path (for `vm.counters`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Exit counts of one vCPU.
#[derive(Default)]
pub struct VcpuCounters {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
    pub hlt: AtomicU64,
    /// KVM_RUN returned early: interrupted by a signal (pause, stop) or an interrupt window.
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

impl VcpuCounters {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let pairs = [
            ("pio_exits", get(&self.pio)),
            ("mmio_exits", get(&self.mmio)),
            ("hlt_exits", get(&self.hlt)),
            ("interrupted_exits", get(&self.interrupted)),
            ("other_exits", get(&self.other)),
        ];
        let mut out: BTreeMap<String, u64> =
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        out.insert("exits".into(), pairs.iter().map(|(_, v)| v).sum());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_each_kind_and_the_total() {
        let c = VcpuCounters::default();
        VcpuCounters::count(&c.pio);
        VcpuCounters::count(&c.pio);
        VcpuCounters::count(&c.hlt);
        let s = c.snapshot();
        assert_eq!(s["pio_exits"], 2);
        assert_eq!(s["hlt_exits"], 1);
        assert_eq!(s["mmio_exits"], 0);
        assert_eq!(s["exits"], 3);
    }
}
