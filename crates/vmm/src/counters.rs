//! What the VM's vCPUs did, counted without locks on their hot path (for `vm.counters`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::emulate::Kind;

/// Exit counts of one vCPU.
#[derive(Default)]
pub struct VcpuCounters {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
    pub hlt: AtomicU64,
    /// KVM_RUN returned early: interrupted by a signal (pause, stop) or an interrupt window.
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
    /// Instructions KVM could not emulate and the VMM completed, per [`Kind`].
    pub completed: [AtomicU64; Kind::ALL.len()],
}

impl VcpuCounters {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an instruction of `kind` completed on vCPU `id`, and says so in the log the first
    /// time and at every power of ten (a guest may do it millions of times).
    pub fn completed(&self, kind: Kind, id: u32) {
        let n = self.completed[kind.index()].fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || (n % 10 == 0 && 10u64.pow(n.ilog10()) == n) {
            tracing::info!(
                "vCPU {id}: completed {} for the host's KVM ({n} so far)",
                kind.name()
            );
        } else {
            tracing::debug!("vCPU {id}: completed {} ({n})", kind.name());
        }
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
        let mut exits: u64 = pairs.iter().map(|(_, v)| v).sum();
        for kind in Kind::ALL {
            let n = get(&self.completed[kind.index()]);
            out.insert(format!("completed_{}", kind.name()), n);
            exits += n;
        }
        out.insert("exits".into(), exits);
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
        assert_eq!(s["completed_int3"], 0);
        c.completed(Kind::LockCmpxchg16b, 0);
        let s = c.snapshot();
        assert_eq!(s["completed_lock_cmpxchg16b"], 1);
        assert_eq!(s["exits"], 4);
    }
}
