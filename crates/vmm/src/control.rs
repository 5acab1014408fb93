//! The VMM process driven through its API (`hyperpool vmm`): every request becomes one
//! [`Action`], handled one at a time in arrival order by [`serve`] on the controlling thread.
//! Front ends (the REST server) only translate requests into actions and replies into responses.
//!
//! States follow Cloud Hypervisor's: no VM → `Created` (vm.create) → `Running` (vm.boot) ⇄
//! `Paused`; vm.shutdown → `Shutdown` (bootable again); vm.delete → no VM. A guest reset reboots
//! the VM; a guest power-off (or a fatal guest error) ends the process, like Cloud Hypervisor.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use hyperpool_api as api;
use hyperpool_devices::ExitRequest;
use kvm_ioctls::Kvm;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::config::{self, VmConfig};
use crate::error::{Error, Result};
use crate::host;
use crate::hotplug::Kind;
use crate::machine;
use crate::run::{self, Outcome};
use crate::running::RunningVm;
use crate::serial_io::HostIo;

mod hotplug;

/// One request to the VMM.
#[derive(Debug)]
pub enum Action {
    Ping,
    VmmShutdown,
    /// With the fds that came with the request (SCM_RIGHTS), for the `net` entries with `fds`.
    Create(Box<api::VmConfig>, Vec<OwnedFd>),
    Boot,
    Info,
    Counters,
    Pause,
    Resume,
    Shutdown,
    Reboot,
    PowerButton,
    Delete,
    AddDisk(Box<api::DiskConfig>),
    /// With the fds that came with the request: the TAP queues, one per queue pair.
    AddNet(Box<api::NetConfig>, Vec<OwnedFd>),
    RemoveDevice(String),
}

#[derive(Debug)]
pub enum Reply {
    Done,
    Ping(api::VmmPingResponse),
    Info(Box<api::VmInfo>),
    Counters(api::VmCounters),
    /// A device was hot-plugged: its id and where.
    PciDevice(api::PciDeviceInfo),
}

/// A refused or failed action: an HTTP status and one line saying what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionError {
    pub status: u16,
    pub message: String,
}

impl ActionError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn no_vm() -> Self {
        Self::new(404, "no VM is created (use vm.create first)")
    }

    fn state(action: &str, state: api::VmState) -> Self {
        Self::new(
            405,
            format!("{action} is not possible while the VM is {state:?}"),
        )
    }
}

pub type Responder = Box<dyn FnOnce(std::result::Result<Reply, ActionError>) + Send>;

/// What the controlling thread waits for.
pub enum Event {
    Api(Action, Responder),
    /// A booted VM's exit latch was set; `boot` says which boot (older ones are stale).
    VmExit {
        boot: u64,
    },
    /// The guest of boot `boot` ejected the PCI `slots` (a bitmap) the host asked to remove.
    Ejected {
        boot: u64,
        slots: u32,
    },
    Signal(i32),
}

/// The VM this process holds.
struct Defined {
    api: api::VmConfig,
    cfg: VmConfig,
    io: HostIo,
    running: Option<RunningVm>,
    shut_down: bool,
}

struct Controller {
    kvm: Kvm,
    events: Sender<Event>,
    vm: Option<Defined>,
    /// Generation of the current boot: bumped on every boot and stop, so an exit event from an
    /// older boot is recognised as stale.
    boots: u64,
    /// How many times the VM booted (for `vm.counters`).
    boot_count: u64,
    start: Instant,
}

/// Serves actions until `vmm.shutdown`, a stop signal or the guest powering off; returns why.
pub fn serve(events: Sender<Event>, inbox: Receiver<Event>, start: Instant) -> Result<Outcome> {
    forward_signals(events.clone())?;
    let mut ctl = Controller {
        kvm: host::open_kvm()?,
        events,
        vm: None,
        boots: 0,
        boot_count: 0,
        start,
    };
    for event in inbox {
        match event {
            Event::Api(Action::VmmShutdown, respond) => {
                ctl.stop_vm();
                respond(Ok(Reply::Done));
                return Ok(Outcome::Stopped);
            }
            Event::Api(action, respond) => {
                let reply = ctl.handle(action);
                respond(reply);
            }
            Event::Signal(sig) => {
                ctl.stop_vm();
                return Ok(Outcome::Signal(sig));
            }
            Event::VmExit { boot } if boot == ctl.boots => {
                if let Some(outcome) = ctl.guest_exit()? {
                    return Ok(outcome);
                }
            }
            Event::VmExit { .. } => {}
            Event::Ejected { boot, slots } if boot == ctl.boots => ctl.ejected(slots),
            Event::Ejected { .. } => {}
        }
    }
    Ok(Outcome::Stopped)
}

fn forward_signals(events: Sender<Event>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(Error::io("installing SIGTERM/SIGINT handlers"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if events.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .map(|_| ())
        .map_err(Error::io("spawning the signal thread"))
}

impl Controller {
    fn state(&self) -> Option<api::VmState> {
        let vm = self.vm.as_ref()?;
        Some(match &vm.running {
            Some(running) if running.is_paused() => api::VmState::Paused,
            Some(_) => api::VmState::Running,
            None if vm.shut_down => api::VmState::Shutdown,
            None => api::VmState::Created,
        })
    }

    fn handle(&mut self, action: Action) -> std::result::Result<Reply, ActionError> {
        use api::VmState::{Created, Paused, Running, Shutdown};
        let state = self.state();
        match (action, state) {
            (Action::Ping, _) => Ok(Reply::Ping(api::VmmPingResponse {
                version: env!("CARGO_PKG_VERSION").into(),
                build_version: None,
                pid: Some(i64::from(std::process::id())),
                features: vec!["kvm".into()],
            })),
            (Action::Create(cfg, fds), None) => self.create_with_fds(*cfg, fds),
            (Action::Create(..), Some(_)) => Err(ActionError::new(
                409,
                "a VM is already created in this VMM (vm.delete it first)",
            )),
            (_, None) => Err(ActionError::no_vm()),
            (Action::Info, Some(state)) => Ok(Reply::Info(Box::new(self.info(state)))),
            (Action::Counters, Some(_)) => Ok(Reply::Counters(self.counters())),
            (Action::Boot, Some(Created | Shutdown)) => self.boot(),
            (Action::Pause, Some(Running)) => self.with_running(|vm| vm.pause()),
            (Action::Resume, Some(Paused)) => self.with_running(|vm| {
                vm.resume();
                Ok(())
            }),
            (Action::PowerButton, Some(Running)) => self.with_running(RunningVm::power_button),
            (Action::Shutdown, Some(Running | Paused)) => {
                self.stop_vm();
                Ok(Reply::Done)
            }
            (Action::Reboot, Some(Running | Paused)) => {
                self.stop_vm();
                self.boot()
            }
            (Action::Delete, Some(_)) => {
                self.stop_vm();
                if let Some(vm) = self.vm.take() {
                    crate::net::release(&net_fds(vm.api.net.iter().flatten()));
                }
                Ok(Reply::Done)
            }
            (Action::AddDisk(disk), Some(Created | Shutdown)) => {
                self.edit_config(|c| c.disks.get_or_insert_default().push(*disk))
            }
            (Action::AddNet(net, fds), Some(state)) => self.add_net(*net, fds, state),
            (Action::RemoveDevice(id), Some(Created | Shutdown)) => self.remove_device(&id),
            (Action::AddDisk(disk), Some(Running | Paused)) => self.hot_add_disk(*disk),
            (Action::RemoveDevice(id), Some(Running | Paused)) => self.hot_remove(&id),
            (action, Some(state)) => Err(ActionError::state(action_name(&action), state)),
        }
    }

    /// `vm.create`: each `net` entry with `fds` takes that many of the received fds, in order.
    fn create_with_fds(
        &mut self,
        mut api_cfg: api::VmConfig,
        fds: Vec<OwnedFd>,
    ) -> std::result::Result<Reply, ActionError> {
        let wanted: usize = api_cfg
            .net
            .iter()
            .flatten()
            .filter_map(|n| n.fds.as_ref())
            .map(Vec::len)
            .sum();
        if wanted != fds.len() {
            return Err(fd_count_error(wanted, fds.len()));
        }
        let raws = crate::net::adopt(fds);
        let mut next = raws.iter().copied();
        for n in api_cfg.net.iter_mut().flatten() {
            if let Some(f) = n.fds.as_mut() {
                f.iter_mut().for_each(|fd| *fd = next.next().unwrap_or(-1));
            }
        }
        let result = self.create(api_cfg);
        if result.is_err() {
            crate::net::release(&raws);
        }
        result
    }

    /// `vm.add-net`: the received fds, if any, are the device's TAP queues.
    fn add_net(
        &mut self,
        mut net: api::NetConfig,
        fds: Vec<OwnedFd>,
        state: api::VmState,
    ) -> std::result::Result<Reply, ActionError> {
        let wanted = net.fds.as_ref().map_or(fds.len(), Vec::len);
        if wanted != fds.len() {
            return Err(fd_count_error(wanted, fds.len()));
        }
        let raws = crate::net::adopt(fds);
        if !raws.is_empty() {
            net.fds = Some(raws.clone());
        }
        let result = match state {
            api::VmState::Running | api::VmState::Paused => self.hot_add_net(net),
            api::VmState::Created | api::VmState::Shutdown => {
                self.edit_config(|c| c.net.get_or_insert_default().push(net))
            }
            state => Err(ActionError::state("vm.add-net", state)),
        };
        if result.is_err() {
            crate::net::release(&raws);
        }
        result
    }

    fn create(&mut self, api_cfg: api::VmConfig) -> std::result::Result<Reply, ActionError> {
        let cfg = config::from_api(&api_cfg).map_err(|e| ActionError::new(400, e))?;
        run::validate(&cfg, host::max_vcpus(&self.kvm), host::host_memory())
            .map_err(|e| ActionError::new(400, e.to_string()))?;
        let io = HostIo::new(&cfg.serial).map_err(|e| ActionError::new(400, e.to_string()))?;
        self.vm = Some(Defined {
            api: api_cfg,
            cfg,
            io,
            running: None,
            shut_down: false,
        });
        Ok(Reply::Done)
    }

    /// Changes the API config of a VM that is not running, and checks the result converts.
    fn edit_config(
        &mut self,
        edit: impl FnOnce(&mut api::VmConfig),
    ) -> std::result::Result<Reply, ActionError> {
        let (api, cfg) = self.checked_edit(edit)?;
        self.commit(api, cfg);
        Ok(Reply::Done)
    }

    /// The VM's API config changed by `edit`, and its conversion, if it converts and keeps
    /// device ids unique; nothing is changed yet.
    fn checked_edit(
        &self,
        edit: impl FnOnce(&mut api::VmConfig),
    ) -> std::result::Result<(api::VmConfig, VmConfig), ActionError> {
        let Some(Defined { api, .. }) = &self.vm else {
            return Err(ActionError::no_vm());
        };
        let mut changed = api.clone();
        edit(&mut changed);
        let converted = config::from_api(&changed).map_err(|e| ActionError::new(400, e))?;
        if let Some(dup) = duplicate_id(&changed) {
            return Err(ActionError::new(
                409,
                format!("a device with id '{dup}' already exists"),
            ));
        }
        Ok((changed, converted))
    }

    fn remove_device(&mut self, id: &str) -> std::result::Result<Reply, ActionError> {
        let Some(Defined { api, .. }) = &self.vm else {
            return Err(ActionError::no_vm());
        };
        let has = |ids: Vec<Option<&String>>| ids.into_iter().any(|i| i.is_some_and(|i| i == id));
        let disks = api.disks.iter().flatten().map(|d| d.id.as_ref()).collect();
        let nets = api.net.iter().flatten().map(|n| n.id.as_ref()).collect();
        if !has(disks) && !has(nets) {
            return Err(ActionError::new(404, format!("no device has id '{id}'")));
        }
        let fds = net_fds(
            api.net
                .iter()
                .flatten()
                .filter(|n| n.id.as_deref() == Some(id)),
        );
        let reply = self.edit_config(|c| {
            if let Some(d) = c.disks.as_mut() {
                d.retain(|d| d.id.as_deref() != Some(id));
            }
            if let Some(n) = c.net.as_mut() {
                n.retain(|n| n.id.as_deref() != Some(id));
            }
        })?;
        crate::net::release(&fds);
        Ok(reply)
    }

    fn with_running(
        &self,
        f: impl FnOnce(&RunningVm) -> Result<()>,
    ) -> std::result::Result<Reply, ActionError> {
        match self.vm.as_ref().and_then(|vm| vm.running.as_ref()) {
            Some(running) => f(running)
                .map(|()| Reply::Done)
                .map_err(|e| ActionError::new(500, e.to_string())),
            None => Err(ActionError::no_vm()),
        }
    }

    fn boot(&mut self) -> std::result::Result<Reply, ActionError> {
        self.boot_vm()
            .map(|()| Reply::Done)
            .map_err(|e| ActionError::new(if e.is_user_error() { 400 } else { 500 }, e.to_string()))
    }

    fn boot_vm(&mut self) -> Result<()> {
        let Some(Defined {
            api,
            cfg,
            io,
            running,
            shut_down,
        }) = &mut self.vm
        else {
            return Err(Error::Config("no VM is created".into()));
        };
        let images = run::load_images(cfg)?;
        let mut machine = machine::build(&self.kvm, cfg, &images, io, self.start)?;
        drop(images);
        let disk_ids: Vec<_> = api.disks.iter().flatten().map(|d| d.id.clone()).collect();
        let net_ids: Vec<_> = api.net.iter().flatten().map(|n| n.id.clone()).collect();
        machine.name_devices(Kind::Disk, &disk_ids);
        machine.name_devices(Kind::Net, &net_ids);
        let (boot, events) = (self.boots + 1, self.events.clone());
        machine
            .hotplug
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_eject(Box::new(move |slots| {
                let _ = events.send(Event::Ejected { boot, slots });
            }));
        let vm = RunningVm::start(machine)?;
        self.boots += 1;
        self.boot_count += 1;
        let (boot, exit, events) = (self.boots, vm.exit().clone(), self.events.clone());
        std::thread::Builder::new()
            .name("vm-exit".into())
            .spawn(move || {
                exit.wait();
                let _ = events.send(Event::VmExit { boot });
            })
            .map_err(Error::io("spawning the VM exit watcher"))?;
        *running = Some(vm);
        *shut_down = false;
        Ok(())
    }

    /// Stops the running VM, if any; the VM stays defined and can boot again.
    fn stop_vm(&mut self) {
        if let Some(Defined {
            running, shut_down, ..
        }) = &mut self.vm
            && let Some(vm) = running.take()
        {
            // Bumping the boot number makes the exit watcher's event stale.
            self.boots += 1;
            vm.stop(ExitRequest::Stop);
            *shut_down = true;
        }
    }

    /// The guest (or a device) ended the current boot: reboot on reset, else end the process.
    fn guest_exit(&mut self) -> Result<Option<Outcome>> {
        let Some(Defined {
            running, shut_down, ..
        }) = &mut self.vm
        else {
            return Ok(None);
        };
        let Some(vm) = running.take() else {
            return Ok(None);
        };
        let request = vm.stop(ExitRequest::Stop);
        *shut_down = true;
        if request == ExitRequest::Reset {
            tracing::info!("guest reset: rebooting the VM");
            self.boot_vm()?;
            return Ok(None);
        }
        run::outcome(request).map(Some)
    }

    fn info(&self, state: api::VmState) -> api::VmInfo {
        let (config, size) = match &self.vm {
            Some(vm) => (vm.api.clone(), vm.cfg.memory.size),
            None => (api::VmConfig::default(), 0),
        };
        api::VmInfo {
            config,
            state,
            memory_actual_size: Some(size),
        }
    }

    fn counters(&self) -> api::VmCounters {
        match self.vm.as_ref().and_then(|vm| vm.running.as_ref()) {
            Some(vm) => {
                let mut c = vm.counters();
                c.insert(
                    "vm".into(),
                    [
                        ("uptime_ms".to_string(), vm.uptime().as_millis() as u64),
                        ("boots".to_string(), self.boot_count),
                        ("memory_resident_bytes".to_string(), vm.resident_memory()),
                    ]
                    .into(),
                );
                c
            }
            None => api::VmCounters::new(),
        }
    }
}

/// The adopted fds that `nets` name.
fn net_fds<'a>(nets: impl Iterator<Item = &'a api::NetConfig>) -> Vec<i32> {
    nets.filter_map(|n| n.fds.clone()).flatten().collect()
}

fn fd_count_error(wanted: usize, got: usize) -> ActionError {
    ActionError::new(
        400,
        format!(
            "field `fds`: {wanted} fds named, {got} received with the request (send the TAP fds as SCM_RIGHTS on the API socket)"
        ),
    )
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Ping => "vmm.ping",
        Action::VmmShutdown => "vmm.shutdown",
        Action::Create(..) => "vm.create",
        Action::Boot => "vm.boot",
        Action::Info => "vm.info",
        Action::Counters => "vm.counters",
        Action::Pause => "vm.pause",
        Action::Resume => "vm.resume",
        Action::Shutdown => "vm.shutdown",
        Action::Reboot => "vm.reboot",
        Action::PowerButton => "vm.power-button",
        Action::Delete => "vm.delete",
        Action::AddDisk(_) => "vm.add-disk",
        Action::AddNet(..) => "vm.add-net",
        Action::RemoveDevice(_) => "vm.remove-device",
    }
}

/// The first device id used twice among disks and nets.
fn duplicate_id(cfg: &api::VmConfig) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    let disks = cfg.disks.iter().flatten().filter_map(|d| d.id.clone());
    let nets = cfg.net.iter().flatten().filter_map(|n| n.id.clone());
    disks.chain(nets).find(|id| !seen.insert(id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_ids_are_found_across_device_kinds() {
        let cfg: api::VmConfig = serde_json::from_str(
            r#"{"disks": [{"path": "/a", "id": "x"}], "net": [{"tap": "t", "id": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(duplicate_id(&cfg).as_deref(), Some("x"));
        let cfg: api::VmConfig =
            serde_json::from_str(r#"{"disks": [{"path": "/a", "id": "x"}, {"path": "/b"}]}"#)
                .unwrap();
        assert_eq!(duplicate_id(&cfg), None);
    }
}
