//! The checks a command line can select (`probe=a,b,c`), by name.

/// One check of the probe; each prints one `PROBE <name> ok|FAIL ...` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Cmdline,
    Mem,
    Acpi,
    Cpus,
    Ring3,
    Pci,
    Rng,
    Blk,
    Vsock,
    Net,
    VsockListen,
    Console,
    Intx,
    Idle,
    Hotplug,
    StrayIrq,
    BenchBlk,
    BenchNet,
}

const NAMES: [(&str, Check); 18] = [
    ("cmdline", Check::Cmdline),
    ("mem", Check::Mem),
    ("acpi", Check::Acpi),
    ("cpus", Check::Cpus),
    ("ring3", Check::Ring3),
    ("pci", Check::Pci),
    ("rng", Check::Rng),
    ("blk", Check::Blk),
    ("vsock", Check::Vsock),
    ("net", Check::Net),
    ("vsock-listen", Check::VsockListen),
    ("console", Check::Console),
    ("intx", Check::Intx),
    ("idle", Check::Idle),
    ("hotplug", Check::Hotplug),
    ("stray-irq", Check::StrayIrq),
    ("bench-blk", Check::BenchBlk),
    ("bench-net", Check::BenchNet),
];

impl Check {
    /// The check called `name`, if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        NAMES.iter().find(|(n, _)| *n == name).map(|&(_, c)| c)
    }
}
