//! Building a VM from its configuration: KVM VM, guest memory, platform devices, ACPI, the loaded
//! kernel and vCPUs ready to run.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hyperpool_acpi::AcpiConfig;
use hyperpool_devices::legacy::{
    AcpiPm, BootTimer, Cmos, DebugExit, Ged, I8042, Serial, SerialInput,
};
use hyperpool_devices::pci::PciHotplug;
use hyperpool_devices::{Bus, ExitSignal, IrqLine, SharedDevice};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::boot::{self, BootSpec, Protocol};
use crate::arch::e820::memory_map;
use crate::arch::layout::{
    ACPI_END, ACPI_START, APIC_START, COM1_IRQ, COM1_PORT, GED_IRQ, GED_START, I8042_PORT,
    IOAPIC_START, KVM_IDENTITY_MAP_START, KVM_TSS_START, MMIO32_START, PCI_HOTPLUG_START, RTC_IRQ,
    ram_ranges,
};
use crate::arch::regs::write_descriptor_tables;
use crate::config::{ConsoleConfig, VmConfig};
use crate::error::{Error, Result};
use crate::pci::Pci;
use crate::vcpu::{self, Buses, VcpuSpec};
use crate::{host, serial_io};
use hyperpool_devices::virtio::{
    Console, ConsoleInput, CounterSet, Rng, VirtioDevice, VirtioPciDevice, Vsock,
};
use vm_memory::GuestMemoryAtomic;

/// The ACPI sleep type for S5 that the DSDT advertises and [`AcpiPm`] accepts.
const S5_SLEEP_TYPE: u8 = 5;
const ACPI_RESET_VALUE: u8 = 1;

/// The kernel to boot, already read into memory.
pub struct BootImages<'a> {
    pub kernel: Cow<'a, [u8]>,
    pub protocol: Protocol,
    pub kernel_name: String,
    pub initramfs: Option<Vec<u8>>,
}

impl BootImages<'_> {
    /// Linux's own boot protocols, or a PVH ELF that carries Linux's banner.
    fn is_linux(&self) -> bool {
        const BANNER: &[u8] = b"Linux version ";
        match self.protocol {
            Protocol::LinuxElf | Protocol::BzImage => true,
            Protocol::Pvh => memchr::memmem::find(&self.kernel, BANNER).is_some(),
            Protocol::Multiboot => false,
        }
    }
}

/// A device the VM reports figures for (`vm.counters`), and where it is plugged.
pub struct DeviceInfo {
    /// `disk0`, `disk1`, ... and `net0`, ... in slot order; `rng`; `vsock`.
    pub id: String,
    /// The device's counters, which its threads update while the VM runs.
    pub counters: Arc<dyn CounterSet>,
    /// Its PCI slot on bus 0.
    pub slot: u8,
    /// Its MSI-X vectors' interrupt lines, given back when it is unplugged.
    pub lines: Vec<IrqLine>,
    /// Its id in the API (`disks[].id`, `net[].id`), by which it can be removed.
    pub api_id: Option<String>,
}

/// A built VM whose vCPUs have not started yet.
pub struct Machine {
    // Field order is drop order: vCPUs and devices go before the VM, memory last.
    pub vcpus: Vec<VcpuFd>,
    pub buses: Buses,
    pub exit: Arc<ExitSignal>,
    /// Where the host's stdin goes: COM1, or the virtio console with `--console tty`.
    pub input: serial_io::HostInput,
    /// The ACPI power button's and PCI hotplug's event device.
    pub ged: Arc<Mutex<Ged>>,
    /// The PCI hotplug controller the DSDT's slot devices drive.
    pub hotplug: Arc<Mutex<PciHotplug>>,
    pub pci: Arc<Pci>,
    pub devices: Vec<DeviceInfo>,
    pub vm: Arc<VmFd>,
    pub memory: GuestMemoryMmap,
}

pub fn build(
    kvm: &Kvm,
    cfg: &VmConfig,
    images: &BootImages,
    io: &serial_io::HostIo,
    start: Instant,
) -> Result<Machine> {
    let cfg = &*crate::device_processes::split_out(cfg)?;
    let vm = Arc::new(kvm.create_vm().map_err(Error::kvm("creating the VM"))?);
    // Memory goes in before the irqchip exists: afterwards each slot change waits for a KVM SRCU
    // grace period (measured on PVM: 0.15 ms before, 6-7 ms after).
    let memory = create_memory(cfg.memory.size, cfg.shared_memory())?;
    register_memory(&vm, &memory)?;
    create_platform(&vm)?;
    let parts = populate(kvm, &vm, &memory, cfg, images, io, start)?;

    Ok(Machine {
        vcpus: parts.vcpus,
        buses: parts.buses,
        exit: parts.exit,
        input: parts.input,
        ged: parts.ged,
        hotplug: parts.hotplug,
        pci: parts.pci,
        devices: parts.devices,
        vm,
        memory,
    })
}

/// The in-kernel interrupt controllers and timer, and the addresses KVM keeps for itself.
fn create_platform(vm: &VmFd) -> Result<()> {
    vm.set_tss_address(KVM_TSS_START as usize)
        .map_err(Error::kvm("setting the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(Error::kvm("setting the identity map address"))?;
    vm.create_irq_chip()
        .map_err(Error::kvm("creating the in-kernel irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(Error::kvm("creating the in-kernel PIT"))
}

/// What [`populate`] makes.
struct Parts {
    vcpus: Vec<VcpuFd>,
    buses: Buses,
    exit: Arc<ExitSignal>,
    input: serial_io::HostInput,
    ged: Arc<Mutex<Ged>>,
    hotplug: Arc<Mutex<PciHotplug>>,
    pci: Arc<Pci>,
    devices: Vec<DeviceInfo>,
}

/// Everything but memory registration: ACPI, the kernel, devices and vCPUs.
fn populate(
    kvm: &Kvm,
    vm: &Arc<VmFd>,
    memory: &GuestMemoryMmap,
    cfg: &VmConfig,
    images: &BootImages,
    io: &serial_io::HostIo,
    start: Instant,
) -> Result<Parts> {
    let map = memory_map(cfg.memory.size);

    let acpi = hyperpool_acpi::build(&acpi_config(cfg.cpus.boot, cfg.memory.size))
        .map_err(|e| Error::Acpi(e.to_string()))?;
    acpi.write_to(memory)
        .map_err(|e| Error::Acpi(e.to_string()))?;
    if let Some(dir) = &cfg.dump_acpi {
        std::fs::create_dir_all(dir)
            .and_then(|_| acpi.dump(dir))
            .map_err(|e| Error::Config(format!("--dump-acpi {}: {e}", dir.display())))?;
    }

    write_descriptor_tables(memory).map_err(|e| Error::Memory(e.to_string()))?;
    let template = host::cpu_template(cfg.cpus.template.as_ref());
    let mut cmdline = cfg.effective_cmdline();
    let words = template.linux_cmdline_words(host::is_pvm());
    // Only then is the image searched for Linux's banner (a whole-image scan).
    if !words.is_empty() && images.is_linux() {
        for word in words {
            if !cmdline.split_whitespace().any(|w| w == word) {
                tracing::info!("adding `{word}` to the kernel command line (CPU template)");
                cmdline = format!("{cmdline} {word}").trim_start().to_string();
            }
        }
    }
    let entry = boot::load(
        memory,
        images.protocol,
        &BootSpec {
            kernel: &images.kernel,
            initramfs: images.initramfs.as_deref(),
            cmdline: &cmdline,
            memory_map: &map,
            rsdp_addr: acpi.rsdp_addr,
        },
    )
    .map_err(|source| Error::Boot {
        path: images.kernel_name.clone(),
        source,
    })?;

    let exit = Arc::new(ExitSignal::new());
    let (mut pio, serial_input) = platform_devices(vm, cfg, &exit, io, start)?;
    if let Some(socket) = &io.serial_socket {
        socket.attach_input(Some(serial_io::HostInput::Serial(serial_input.clone())));
    }
    let mut mmio = Bus::new();
    let ged = power_button(vm, &mut mmio)?;
    let hotplug = Arc::new(Mutex::new(PciHotplug::new()));
    mmio.insert(PCI_HOTPLUG_START, PciHotplug::SIZE, hotplug.clone())
        .map_err(|e| Error::Devices(format!("placing the PCI hotplug controller: {e}")))?;
    let pci = Arc::new(Pci::new(vm, cfg.memory.size)?);
    let (devices, console) = add_devices(&pci, memory, cfg)?;
    let input = match console {
        Some(console) if cfg.console == ConsoleConfig::Tty => {
            serial_io::HostInput::Console(console)
        }
        _ => serial_io::HostInput::Serial(serial_input),
    };
    pci.attach(&mut pio, &mut mmio)?;
    let buses = Buses {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
    };

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("reading supported CPUID"))?;
    let vcpus = (0..cfg.cpus.boot)
        .map(|id| {
            vcpu::create(
                vm,
                &VcpuSpec {
                    id,
                    count: cfg.cpus.boot,
                    supported_cpuid: &supported,
                    template: &template,
                    entry: (id == 0).then_some(entry),
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;

    Ok(Parts {
        vcpus,
        buses,
        exit,
        input,
        ged,
        hotplug,
        pci,
        devices,
    })
}

/// The Generic Event Device the DSDT's power button notifies through.
fn power_button(vm: &VmFd, mmio: &mut Bus) -> Result<Arc<Mutex<Ged>>> {
    let irq = IrqLine::new(GED_IRQ).map_err(Error::io("creating the GED interrupt eventfd"))?;
    vm.register_irqfd(irq.eventfd(), irq.gsi())
        .map_err(Error::kvm("registering the GED irqfd"))?;
    let ged = Arc::new(Mutex::new(Ged::new(irq)));
    mmio.insert(GED_START, Ged::SIZE, ged.clone())
        .map_err(|e| Error::Devices(format!("placing the GED: {e}")))?;
    Ok(ged)
}

/// The VM's PCI devices, in slot order: one line per device kind. Returns the devices with
/// counters, and the virtio console's input, if there is a console.
fn add_devices(
    pci: &Pci,
    memory: &GuestMemoryMmap,
    cfg: &VmConfig,
) -> Result<(Vec<DeviceInfo>, Option<ConsoleInput>)> {
    let mut devices = Vec::new();
    let mut add = |id: String, device: Box<dyn VirtioDevice>, counters: Arc<dyn CounterSet>| {
        let (slot, lines) = add_virtio(pci, memory, device)?;
        devices.push(DeviceInfo {
            id,
            counters,
            slot,
            lines,
            api_id: None,
        });
        Ok::<_, Error>(())
    };
    if cfg.rng {
        let dev = Rng::new();
        let counters = dev.counters();
        add("rng".into(), Box::new(dev), counters)?;
    }
    if let Some(v) = &cfg.vsock {
        let dev = Vsock::new(u64::from(v.cid), &v.socket)
            .map_err(|e| Error::Config(format!("--vsock socket={}: {e}", v.socket.display())))?;
        let counters = dev.counters();
        add("vsock".into(), Box::new(dev), counters)?;
    }
    for (i, (disk, counters)) in crate::disk::open_all(&cfg.disks)?.into_iter().enumerate() {
        add(format!("disk{i}"), disk, counters)?;
    }
    for (i, (net, counters)) in crate::net::open_all(&cfg.nets)?.into_iter().enumerate() {
        add(format!("net{i}"), net, counters)?;
    }
    let console = add_console(pci, memory, cfg)?;
    Ok((devices, console))
}

/// Puts a virtio device on the PCI segment with its own MSI-X vectors; returns its slot and
/// the vectors' lines. On failure nothing stays allocated.
pub(crate) fn add_virtio(
    pci: &Pci,
    memory: &GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
) -> Result<(u8, Vec<IrqLine>)> {
    let lines = pci.msi_lines(VirtioPciDevice::vectors_for(device.as_ref()))?;
    let mem = GuestMemoryAtomic::new(memory.clone());
    let added = VirtioPciDevice::new(device, mem, lines.clone(), pci.msi_routing())
        .map_err(|e| Error::Devices(format!("virtio: {e}")))
        .and_then(|dev| pci.add_device(Arc::new(Mutex::new(dev))));
    match added {
        Ok(slot) => Ok((slot, lines)),
        Err(e) => {
            pci.release_lines(&lines);
            Err(e)
        }
    }
}

/// The virtio console (`--console`), if any; returns its input.
fn add_console(
    pci: &Pci,
    memory: &GuestMemoryMmap,
    cfg: &VmConfig,
) -> Result<Option<ConsoleInput>> {
    let Some(output) = serial_io::console_output(&cfg.console)? else {
        return Ok(None);
    };
    let dev = Console::new(output).map_err(Error::io("creating the virtio console"))?;
    let input = dev.input();
    add_virtio(pci, memory, Box::new(dev))?;
    Ok(Some(input))
}

/// Guest RAM: private anonymous memory (only what the guest touches is ever allocated, and
/// nothing else can map it), or with `shared` one memfd mapped shared, whose fd a vhost-user
/// backend maps too.
fn create_memory(size: u64, shared: bool) -> Result<GuestMemoryMmap> {
    let ranges = ram_ranges(size);
    if !shared {
        let ranges: Vec<(GuestAddress, usize)> = ranges
            .into_iter()
            .map(|(start, len)| (GuestAddress(start), len as usize))
            .collect();
        return GuestMemoryMmap::<()>::from_ranges(&ranges)
            .map_err(|e| Error::Memory(e.to_string()));
    }
    let file = crate::memfd::create("hyperpool-guest-ram", size)
        .map_err(Error::io("creating the shared guest memory (memfd)"))?;
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ranges {
        let fd = file
            .try_clone()
            .map_err(Error::io("sharing the guest memory fd"))?;
        regions.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(fd, offset)),
        ));
        offset += len;
    }
    GuestMemoryMmap::<()>::from_ranges_with_files(regions).map_err(|e| Error::Memory(e.to_string()))
}

fn register_memory(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by `memory`,
        // which `Machine` keeps alive (and drops after the VM) for as long as KVM can use it.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(Error::kvm("registering guest memory"))?;
    }
    Ok(())
}

fn acpi_config(cpus: u32, mem_size: u64) -> AcpiConfig {
    AcpiConfig {
        cpus,
        rsdp_addr: ACPI_START,
        tables_end: ACPI_END,
        lapic_addr: APIC_START as u32,
        ioapic_addr: IOAPIC_START as u32,
        ioapic_id: 0,
        ioapic_gsi_base: 0,
        sleep_control_port: AcpiPm::PORT + AcpiPm::SLEEP_CONTROL as u16,
        sleep_status_port: AcpiPm::PORT + AcpiPm::SLEEP_STATUS as u16,
        reset_port: AcpiPm::PORT + AcpiPm::RESET as u16,
        reset_value: ACPI_RESET_VALUE,
        s5_sleep_type: S5_SLEEP_TYPE,
        serial: Some((COM1_PORT, COM1_IRQ as u8)),
        i8042: true,
        rtc: Some((Cmos::PORT, RTC_IRQ)),
        pci: Some(crate::pci::acpi_config(mem_size)),
        ged: Some((GED_START as u32, GED_IRQ)),
        pci_hotplug: Some(PCI_HOTPLUG_START as u32),
    }
}

fn platform_devices(
    vm: &VmFd,
    cfg: &VmConfig,
    exit: &Arc<ExitSignal>,
    io: &serial_io::HostIo,
    start: Instant,
) -> Result<(Bus, SerialInput)> {
    let irq = IrqLine::new(COM1_IRQ).map_err(Error::io("creating the COM1 interrupt eventfd"))?;
    vm.register_irqfd(irq.eventfd(), irq.gsi())
        .map_err(Error::kvm("registering the COM1 irqfd"))?;
    let serial = Arc::new(Mutex::new(Serial::new(
        irq,
        serial_io::output(&cfg.serial, io)?,
    )));

    let below_4g = cfg.memory.size.min(MMIO32_START);
    let devices: Vec<(u16, u64, SharedDevice)> = vec![
        (COM1_PORT, 8, serial.clone()),
        (
            I8042_PORT,
            I8042::PORT_SPAN,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        ),
        (
            Cmos::PORT,
            Cmos::PORT_SPAN,
            Arc::new(Mutex::new(Cmos::new(below_4g, cfg.memory.size - below_4g))),
        ),
        (
            DebugExit::PORT,
            DebugExit::PORT_SPAN,
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        ),
        (
            BootTimer::PORT,
            1,
            Arc::new(Mutex::new(BootTimer::new(start))),
        ),
        (
            AcpiPm::PORT,
            AcpiPm::PORT_SPAN,
            Arc::new(Mutex::new(AcpiPm::new(
                exit.clone(),
                S5_SLEEP_TYPE,
                ACPI_RESET_VALUE,
            ))),
        ),
    ];
    let mut pio = Bus::new();
    for (port, len, dev) in devices {
        pio.insert(u64::from(port), len, dev)
            .map_err(|e| Error::Devices(e.to_string()))?;
    }
    Ok((pio, SerialInput(serial)))
}
