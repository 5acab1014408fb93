//! The pool's one action type and the thread that carries actions out, one at a time in
//! arrival order. Front ends (the REST server) only translate requests into [`PoolAction`]s;
//! VMM watchers and timers feed the same queue, so every change to a VM is made in one place.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyperpool_api::pool::{
    LiveFigures, PoolInfo, RestartPolicy, VmDetails, VmRecord, VmSpec, VmStatus,
};

use crate::cgroup::VmCgroup;
use crate::layout::Layout;
use crate::pool::{self, Capacity};
use crate::store::Store;
use crate::vmm_process::{self, Ended};
use crate::{metrics, overlay, spec};

#[derive(Debug)]
pub enum PoolAction {
    Create(Box<VmSpec>),
    Start(String),
    /// The ACPI power button, then (after the stop timeout) a forced stop.
    Stop(String),
    Kill(String),
    Pause(String),
    Resume(String),
    Restart(String),
    Delete(String),
    List,
    Inspect(String),
    Pool,
    Metrics,
}

#[derive(Debug)]
pub enum PoolReply {
    Done,
    Record(Box<VmRecord>),
    Details(Box<VmDetails>),
    List(Vec<VmRecord>),
    Pool(PoolInfo),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolError {
    pub status: u16,
    pub message: String,
}

fn error(status: u16, message: impl Into<String>) -> PoolError {
    PoolError {
        status,
        message: message.into(),
    }
}

pub type Responder = Box<dyn FnOnce(Result<PoolReply, PoolError>) + Send>;

pub enum Event {
    Action(PoolAction, Responder),
    /// A VMM process ended (seen by its watcher).
    Ended {
        name: String,
        pid: u32,
        how: Ended,
    },
    /// A stop's grace period is over.
    StopTimeout {
        name: String,
        pid: u32,
    },
}

pub struct Settings {
    pub layout: Layout,
    pub vmm_binary: PathBuf,
    pub capacity: Capacity,
    pub stop_timeout: Duration,
}

/// What the daemon holds for a VM whose VMM runs.
struct Running {
    pid: u32,
    /// The end was asked for (stop, kill, delete): not a crash, no restart.
    stopping: bool,
    /// Exits counted at the last inspect, for the rate.
    last_exits: Option<(Instant, u64)>,
}

/// Restarts allowed within [`RESTART_WINDOW`] before a crash-looping VM is left crashed.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

pub struct Controller {
    settings: Settings,
    store: Store,
    events: Sender<Event>,
    records: BTreeMap<String, VmRecord>,
    running: HashMap<String, Running>,
    recent_restarts: HashMap<String, Vec<Instant>>,
    cgroups_warned: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Controller {
    /// Loads the records and re-attaches to the VMMs that survived a daemon restart.
    pub fn new(settings: Settings, store: Store, events: Sender<Event>) -> Result<Self, String> {
        let records = store
            .list()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r| (r.spec.name.clone(), r))
            .collect();
        let mut ctl = Self {
            settings,
            store,
            events,
            records,
            running: HashMap::new(),
            recent_restarts: HashMap::new(),
            cgroups_warned: false,
        };
        ctl.reattach();
        Ok(ctl)
    }

    pub fn run(mut self, inbox: Receiver<Event>) {
        for event in inbox {
            match event {
                Event::Action(action, respond) => {
                    let reply = self.handle(action);
                    respond(reply);
                }
                Event::Ended { name, pid, how } => self.ended(&name, pid, how),
                Event::StopTimeout { name, pid } => self.stop_timeout(&name, pid),
            }
        }
    }

    fn reattach(&mut self) {
        let names: Vec<String> = self.records.keys().cloned().collect();
        for name in names {
            let record = &self.records[&name];
            if !matches!(record.status, VmStatus::Running | VmStatus::Paused) {
                continue;
            }
            let socket = self.settings.layout.api_socket(&name);
            match record.pid {
                Some(pid)
                    if vmm_process::is_our_vmm(pid, &socket)
                        && vmm_process::get(&socket, "vm.info").is_ok() =>
                {
                    tracing::info!("{name}: re-attached to its VMM (pid {pid})");
                    self.watch_adopted(&name, pid);
                }
                _ => {
                    tracing::warn!("{name}: its VMM ended while the daemon was down");
                    self.ended_unwatched(&name, "the VMM ended while the daemon was down");
                }
            }
        }
    }

    fn handle(&mut self, action: PoolAction) -> Result<PoolReply, PoolError> {
        match action {
            PoolAction::Create(spec) => self.create(*spec),
            PoolAction::Start(name) => self.start(&name).map(|()| self.record_reply(&name)),
            PoolAction::Stop(name) => self.stop(&name).map(|()| PoolReply::Done),
            PoolAction::Kill(name) => self.kill(&name).map(|()| PoolReply::Done),
            PoolAction::Pause(name) => self.pause_resume(&name, true),
            PoolAction::Resume(name) => self.pause_resume(&name, false),
            PoolAction::Restart(name) => self.restart(&name),
            PoolAction::Delete(name) => self.delete(&name),
            PoolAction::List => Ok(PoolReply::List(self.records.values().cloned().collect())),
            PoolAction::Inspect(name) => self.inspect(&name),
            PoolAction::Pool => Ok(PoolReply::Pool(self.pool_info())),
            PoolAction::Metrics => Ok(PoolReply::Text(self.metrics())),
        }
    }

    fn record(&self, name: &str) -> Result<&VmRecord, PoolError> {
        self.records
            .get(name)
            .ok_or_else(|| error(404, format!("no VM named '{name}' (see 'hyperpool ls')")))
    }

    fn record_reply(&self, name: &str) -> PoolReply {
        PoolReply::Record(Box::new(self.records[name].clone()))
    }

    /// Stores a changed record (one transaction) and keeps the copy in memory.
    fn save(&mut self, record: VmRecord) -> Result<(), PoolError> {
        self.store
            .put(&record)
            .map_err(|e| error(500, e.to_string()))?;
        self.records.insert(record.spec.name.clone(), record);
        Ok(())
    }

    fn create(&mut self, spec: VmSpec) -> Result<PoolReply, PoolError> {
        spec::check(&spec).map_err(|e| error(400, e))?;
        if self.records.contains_key(&spec.name) {
            return Err(error(
                409,
                format!(
                    "a VM named '{}' exists already (pick another name or rm it)",
                    spec.name
                ),
            ));
        }
        // The config must convert now, so a bad spec is refused at create, not at start.
        let cfg = spec::vm_config(&spec, &self.settings.layout).map_err(|e| error(400, e))?;
        cfg.check().map_err(|e| error(400, e.to_string()))?;
        let files = spec
            .disks
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                Some((format!("disks[{i}]"), d.base.as_ref().or(d.path.as_ref())?))
            })
            .chain(spec.kernel.iter().map(|k| ("kernel".to_string(), k)))
            .chain(spec.initramfs.iter().map(|k| ("initramfs".to_string(), k)));
        for (field, path) in files {
            if !std::path::Path::new(path).is_file() {
                return Err(error(400, format!("{field}: {path} is not a file")));
            }
        }
        let name = spec.name.clone();
        self.save(VmRecord {
            spec,
            status: VmStatus::Stopped,
            pid: None,
            started_at_ms: None,
            last_exit: None,
            restarts: 0,
        })?;
        Ok(self.record_reply(&name))
    }

    fn start(&mut self, name: &str) -> Result<(), PoolError> {
        let record = self.record(name)?.clone();
        if self.running.contains_key(name) {
            return Err(error(409, format!("{name} is already running")));
        }
        let all: Vec<VmRecord> = self.records.values().cloned().collect();
        self.settings
            .capacity
            .admit(&all, &record)
            .map_err(|e| error(409, format!("{name}: {e}")))?;
        let layout = self.settings.layout.clone();
        let dir = layout.vm_dir(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| error(500, format!("creating {}: {e}", dir.display())))?;
        for (i, d) in record.spec.disks.iter().enumerate() {
            if let Some(base) = &d.base {
                let overlay_path = layout.overlay(name, i);
                if !crate::layout::exists(&overlay_path) {
                    overlay::create(std::path::Path::new(base), &overlay_path)
                        .map_err(|e| error(400, format!("{name}: disks[{i}]: {e}")))?;
                }
            }
        }
        let cfg = spec::vm_config(&record.spec, &layout).map_err(|e| error(400, e))?;
        let socket = layout.api_socket(name);
        let mut child =
            vmm_process::spawn(&self.settings.vmm_binary, &socket, &layout.vmm_log(name))
                .map_err(|e| error(500, format!("{name}: {e}")))?;
        let pid = child.id();
        let configured = serde_json::to_value(&cfg)
            .map_err(|e| e.to_string())
            .and_then(|body| vmm_process::put(&socket, "vm.create", Some(&body)))
            .and_then(|()| vmm_process::put(&socket, "vm.boot", None));
        if let Err(e) = configured {
            let _ = child.kill();
            let _ = child.wait();
            return Err(error(400, format!("{name}: {e}")));
        }
        match VmCgroup::place(&record.spec, pid) {
            Ok(()) => {}
            Err(e) => {
                if record.spec.placement.is_some() {
                    // The user asked for placement: running without it would be a lie.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(error(500, format!("{name}: {e}")));
                }
                if !self.cgroups_warned {
                    tracing::warn!("{e}; VMs run without cgroup limits");
                    self.cgroups_warned = true;
                }
            }
        }
        let events = self.events.clone();
        let watched = name.to_string();
        std::thread::Builder::new()
            .name(format!("watch-{name}"))
            .spawn(move || {
                let how = vmm_process::wait_child(child);
                let _ = events.send(Event::Ended {
                    name: watched,
                    pid,
                    how,
                });
            })
            .map_err(|e| error(500, format!("watching {name}: {e}")))?;
        self.running.insert(
            name.to_string(),
            Running {
                pid,
                stopping: false,
                last_exits: None,
            },
        );
        let mut record = record;
        record.status = VmStatus::Running;
        record.pid = Some(pid);
        record.started_at_ms = Some(now_ms());
        tracing::info!("{name}: started (VMM pid {pid})");
        self.save(record)
    }

    fn watch_adopted(&mut self, name: &str, pid: u32) {
        let socket = self.settings.layout.api_socket(name);
        let events = self.events.clone();
        let watched = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{name}"))
            .spawn(move || {
                let how = vmm_process::wait_adopted(pid, socket);
                let _ = events.send(Event::Ended {
                    name: watched,
                    pid,
                    how,
                });
            });
        if let Err(e) = spawned {
            tracing::error!("watching {name}: {e}");
        }
        self.running.insert(
            name.to_string(),
            Running {
                pid,
                stopping: false,
                last_exits: None,
            },
        );
    }

    fn running_pid(&self, name: &str) -> Result<u32, PoolError> {
        self.record(name)?;
        self.running
            .get(name)
            .map(|r| r.pid)
            .ok_or_else(|| error(409, format!("{name} is not running")))
    }

    fn stop(&mut self, name: &str) -> Result<(), PoolError> {
        let pid = self.running_pid(name)?;
        let socket = self.settings.layout.api_socket(name);
        if self.records[name].status == VmStatus::Paused {
            let _ = vmm_process::put(&socket, "vm.resume", None);
        }
        if let Some(r) = self.running.get_mut(name) {
            r.stopping = true;
        }
        if let Err(e) = vmm_process::put(&socket, "vm.power-button", None) {
            tracing::warn!("{name}: power button: {e}; stopping it now");
            self.force_stop(name, pid);
            return Ok(());
        }
        let (events, name, timeout) = (
            self.events.clone(),
            name.to_string(),
            self.settings.stop_timeout,
        );
        let _ = std::thread::Builder::new()
            .name("stop-timer".into())
            .spawn(move || {
                std::thread::sleep(timeout);
                let _ = events.send(Event::StopTimeout { name, pid });
            });
        Ok(())
    }

    fn stop_timeout(&mut self, name: &str, pid: u32) {
        if self.running.get(name).is_some_and(|r| r.pid == pid) {
            tracing::info!("{name}: the guest did not power off in time; stopping it");
            self.force_stop(name, pid);
        }
    }

    /// Ends the VMM: through its API, else SIGKILL.
    fn force_stop(&mut self, name: &str, pid: u32) {
        let socket = self.settings.layout.api_socket(name);
        if vmm_process::put(&socket, "vmm.shutdown", None).is_err() {
            kill(pid);
        }
    }

    fn kill(&mut self, name: &str) -> Result<(), PoolError> {
        let pid = self.running_pid(name)?;
        if let Some(r) = self.running.get_mut(name) {
            r.stopping = true;
        }
        kill(pid);
        Ok(())
    }

    fn pause_resume(&mut self, name: &str, pause: bool) -> Result<PoolReply, PoolError> {
        self.running_pid(name)?;
        let socket = self.settings.layout.api_socket(name);
        let endpoint = if pause { "vm.pause" } else { "vm.resume" };
        vmm_process::put(&socket, endpoint, None)
            .map_err(|e| error(409, format!("{name}: {e}")))?;
        let mut record = self.records[name].clone();
        record.status = if pause {
            VmStatus::Paused
        } else {
            VmStatus::Running
        };
        self.save(record)?;
        Ok(self.record_reply(name))
    }

    fn restart(&mut self, name: &str) -> Result<PoolReply, PoolError> {
        self.running_pid(name)?;
        let socket = self.settings.layout.api_socket(name);
        vmm_process::put(&socket, "vm.reboot", None)
            .map_err(|e| error(409, format!("{name}: {e}")))?;
        let mut record = self.records[name].clone();
        record.status = VmStatus::Running;
        record.started_at_ms = Some(now_ms());
        self.save(record)?;
        Ok(self.record_reply(name))
    }

    fn delete(&mut self, name: &str) -> Result<PoolReply, PoolError> {
        self.record(name)?;
        if self.running.contains_key(name) {
            return Err(error(
                409,
                format!("{name} is running; stop or kill it first"),
            ));
        }
        let dir = self.settings.layout.vm_dir(name);
        if crate::layout::exists(&dir) {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| error(500, format!("removing {}: {e}", dir.display())))?;
        }
        self.store
            .delete(name)
            .map_err(|e| error(500, e.to_string()))?;
        self.records.remove(name);
        tracing::info!("{name}: deleted");
        Ok(PoolReply::Done)
    }

    /// A VMM ended: record how, clean up, restart if its policy says so.
    fn ended(&mut self, name: &str, pid: u32, how: Ended) {
        let Some(running) = self.running.get(name) else {
            return;
        };
        if running.pid != pid {
            return;
        }
        let stopping = running.stopping;
        self.running.remove(name);
        VmCgroup::remove(name);
        let _ = std::fs::remove_file(self.settings.layout.api_socket(name));
        let Some(mut record) = self.records.get(name).cloned() else {
            return;
        };
        record.pid = None;
        let (status, why) = match (&how, stopping) {
            (_, true) => (VmStatus::Stopped, None),
            (Ended::Clean, false) => (VmStatus::Stopped, Some("the guest powered off".to_string())),
            (Ended::Failed(why), false) => (VmStatus::Crashed, Some(why.clone())),
        };
        record.status = status;
        record.last_exit = why.clone().or(record.last_exit);
        tracing::info!("{name}: ended ({})", why.as_deref().unwrap_or("stopped"));
        let restart = !stopping
            && match record.spec.restart {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => status == VmStatus::Crashed,
                RestartPolicy::Always => true,
            };
        if let Err(e) = self.save(record) {
            tracing::error!("{name}: {}", e.message);
        }
        if restart {
            self.restart_after_end(name);
        }
    }

    /// A running VM whose VMM is gone and had no watcher (found at daemon start).
    fn ended_unwatched(&mut self, name: &str, why: &str) {
        let mut record = self.records[name].clone();
        record.status = VmStatus::Crashed;
        record.pid = None;
        record.last_exit = Some(why.to_string());
        VmCgroup::remove(name);
        let restart = record.spec.restart != RestartPolicy::Never;
        if let Err(e) = self.save(record) {
            tracing::error!("{name}: {}", e.message);
        }
        if restart {
            self.restart_after_end(name);
        }
    }

    fn restart_after_end(&mut self, name: &str) {
        let now = Instant::now();
        let recent = self.recent_restarts.entry(name.to_string()).or_default();
        recent.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if recent.len() >= MAX_RESTARTS {
            tracing::error!(
                "{name}: restarted {MAX_RESTARTS} times within {RESTART_WINDOW:?}; leaving it crashed"
            );
            if let Some(mut r) = self.records.get(name).cloned() {
                r.last_exit = Some(format!(
                    "{} (restarted {MAX_RESTARTS} times within {}s; given up)",
                    r.last_exit.unwrap_or_default(),
                    RESTART_WINDOW.as_secs()
                ));
                let _ = self.save(r);
            }
            return;
        }
        recent.push(now);
        match self.start(name) {
            Ok(()) => {
                if let Some(mut r) = self.records.get(name).cloned() {
                    r.restarts += 1;
                    let _ = self.save(r);
                }
                tracing::info!("{name}: restarted by its policy");
            }
            Err(e) => tracing::error!("{name}: restart failed: {}", e.message),
        }
    }

    fn inspect(&mut self, name: &str) -> Result<PoolReply, PoolError> {
        let record = self.record(name)?.clone();
        let live = self.running.get(name).map(|r| r.pid).map(|pid| {
            let socket = self.settings.layout.api_socket(name);
            let counters: hyperpool_api::VmCounters = vmm_process::get(&socket, "vm.counters")
                .ok()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            let exits: u64 = counters
                .iter()
                .filter(|(k, _)| k.starts_with("vcpu"))
                .filter_map(|(_, c)| c.get("exits"))
                .sum();
            let now = Instant::now();
            let rate = match self.running.get(name).and_then(|r| r.last_exits) {
                Some((t, before)) if now > t => {
                    exits.saturating_sub(before) as f64 / now.duration_since(t).as_secs_f64()
                }
                _ => 0.0,
            };
            if let Some(r) = self.running.get_mut(name) {
                r.last_exits = Some((now, exits));
            }
            let (cpu_time_ms, rss) = vmm_process::process_figures(pid).unwrap_or((0, 0));
            let resident_guest_bytes = counters
                .get("vm")
                .and_then(|vm| vm.get("memory_resident_bytes"))
                .copied()
                .unwrap_or(0);
            let devices = counters
                .into_iter()
                .filter(|(k, _)| !k.starts_with("vcpu") && k != "vm")
                .collect();
            LiveFigures {
                uptime_ms: record
                    .started_at_ms
                    .map_or(0, |t| now_ms().saturating_sub(t)),
                cpu_time_ms,
                resident_guest_bytes,
                vmm_rss_bytes: rss,
                vm_exits: exits,
                vm_exits_per_sec: rate,
                devices,
            }
        });
        Ok(PoolReply::Details(Box::new(VmDetails {
            console_socket: self.running.contains_key(name).then(|| {
                self.settings
                    .layout
                    .console_socket(name)
                    .display()
                    .to_string()
            }),
            record,
            live,
        })))
    }

    fn pool_info(&self) -> PoolInfo {
        let records: Vec<VmRecord> = self.records.values().cloned().collect();
        self.settings
            .capacity
            .info(&records, pool::disk_space(&self.settings.layout.state_dir))
    }

    fn metrics(&self) -> String {
        let records: Vec<VmRecord> = self.records.values().cloned().collect();
        let figures: Vec<(String, Option<(u64, u64)>)> = records
            .iter()
            .map(|r| {
                let fig = self
                    .running
                    .get(&r.spec.name)
                    .and_then(|run| vmm_process::process_figures(run.pid));
                (r.spec.name.clone(), fig)
            })
            .collect();
        metrics::render(&self.pool_info(), &records, &figures)
    }
}

fn kill(pid: u32) {
    // SAFETY: kill(2) with a pid we started (or re-attached to after checking its command line)
    // has no memory effects.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}
