//! What a device did, counted on its hot path without locks, for the VMM's `vm.counters`.
//!
//! A device declares its set with [`counter_set!`]: a struct with one [`Counter`] per name, which
//! its threads bump (a relaxed atomic add: no lock, no allocation) and the VMM reads at any time
//! through [`CounterSet::snapshot`]. Counts start at zero when the device is built and survive
//! resets of the device by its driver. A device served by several threads gives each thread a
//! set of its own and reports their sum ([`Summed`]); with `#[repr(align(64))]` on the set, the
//! threads never write to the same cache line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One event count. Relaxed: each counter is an independent statistic; nothing is ordered by it.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A device's counters as the VMM reports them: counter name → value.
pub trait CounterSet: Send + Sync {
    fn snapshot(&self) -> BTreeMap<String, u64>;
}

/// Declares a counter set: a struct with a public [`Counter`] per field and its
/// [`CounterSet::snapshot`] under the field names (which are therefore the API's names).
macro_rules! counter_set {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($(#[$fmeta:meta])* $field:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $($(#[$fmeta])* pub $field: $crate::virtio::counters::Counter,)+
        }

        impl $crate::virtio::counters::CounterSet for $name {
            fn snapshot(&self) -> ::std::collections::BTreeMap<String, u64> {
                [$((stringify!($field), self.$field.get())),+]
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), value))
                    .collect()
            }
        }
    };
}
pub(crate) use counter_set;

/// The sets of one device's threads (e.g. a network device's queue pairs), reported as their sum.
#[derive(Debug)]
pub struct Summed<T> {
    parts: Vec<Arc<T>>,
}

impl<T: Default> Summed<T> {
    pub fn new(parts: usize) -> Self {
        Self {
            parts: (0..parts).map(|_| Arc::default()).collect(),
        }
    }
}

impl<T> Summed<T> {
    /// Part `i`'s set, for the thread that serves it.
    pub fn part(&self, i: usize) -> Option<&Arc<T>> {
        self.parts.get(i)
    }
}

impl<T: CounterSet> CounterSet for Summed<T> {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        let mut total = BTreeMap::new();
        for part in &self.parts {
            for (name, value) in part.snapshot() {
                let sum: &mut u64 = total.entry(name).or_default();
                *sum = sum.wrapping_add(value);
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    counter_set! {
        struct Demo { apples, pears }
    }

    #[test]
    fn a_set_reports_each_counter_by_its_field_name() {
        let d = Demo::default();
        d.apples.add(3);
        d.apples.inc();
        let s = d.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s["apples"], 4);
        assert_eq!(s["pears"], 0);
    }

    #[test]
    fn summed_parts_add_up_per_name() {
        let sum = Summed::<Demo>::new(3);
        sum.part(0).unwrap().apples.add(5);
        sum.part(2).unwrap().apples.add(7);
        sum.part(1).unwrap().pears.inc();
        assert!(sum.part(3).is_none());
        let s = sum.snapshot();
        assert_eq!((s["apples"], s["pears"]), (12, 1));
        // Threads bumping their own parts concurrently lose nothing.
        let sum = Arc::new(Summed::<Demo>::new(4));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let part = sum.part(i).unwrap().clone();
                std::thread::spawn(move || (0..10_000).for_each(|_| part.pears.inc()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(sum.snapshot()["pears"], 40_000);
    }
}
