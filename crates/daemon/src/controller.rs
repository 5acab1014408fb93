//! The pool's one action type and the thread that carries actions out, one at a time in
//! arrival order. Front ends (the REST server) only translate requests into [`PoolAction`]s;
//! VMM watchers and timers feed the same queue, so every change to a VM is made in one place.
//! A start is the exception in timing, not in place: it is admitted here, its slow part (the
//! VMM process, vm.create, vm.boot) runs on a thread of its own (`launch`), and its result
//! comes back through the queue to be committed here, so starts overlap.
//!
//! Changes are committed to the store once the queue is drained (or after [`MAX_HELD`]
//! replies), and the replies that acknowledge them are held until then: a burst of requests
//! shares one disk sync, and nothing is acknowledged before it is durable.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyperpool_api::pool::{PoolInfo, RestartPolicy, VmDetails, VmRecord, VmSpec, VmStatus};

use crate::cgroup::VmCgroup;
use crate::launch::{self, Launch, Launched};
use crate::layout::Layout;
use crate::live::LiveSource;
use crate::pool::{self, Capacity, Usage};
use crate::store::Store;
use crate::vmm_process::{self, Ended};
use crate::{metrics, spec};

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
    /// Without live figures; for a running VM, where to gather them (see `live`).
    Details(Box<VmDetails>, Option<LiveSource>),
    List(Vec<VmRecord>),
    Pool(PoolInfo),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolError {
    pub status: u16,
    pub message: String,
}

impl PoolError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

fn error(status: u16, message: impl Into<String>) -> PoolError {
    PoolError::new(status, message)
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
    /// A start's slow part is done (see `launch`): the VMM runs the guest, or it failed.
    Started {
        name: String,
        outcome: Result<Launched, PoolError>,
    },
    /// An inspect counted this many exits: the base of the next one's rate.
    Exits {
        name: String,
        pid: u32,
        seen: (Instant, u64),
    },
}

/// Who asked for a start, to be told how it went.
pub enum StartedBy {
    Api(Responder),
    /// The VM's restart policy, after its VMM ended.
    Policy,
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
/// Replies held for a commit before it is made even though more requests are queued.
const MAX_HELD: usize = 256;

pub struct Controller {
    settings: Settings,
    store: Store,
    events: Sender<Event>,
    records: BTreeMap<String, VmRecord>,
    running: HashMap<String, Running>,
    /// VMs whose start is under way on a launch thread: admitted (they count against the
    /// pool's capacity) but not yet running.
    starting: HashMap<String, StartedBy>,
    recent_restarts: HashMap<String, Vec<Instant>>,
    cgroups_warned: bool,
    /// Replies waiting for the commit of the changes they acknowledge.
    held: Vec<(Responder, Result<PoolReply, PoolError>)>,
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
            starting: HashMap::new(),
            recent_restarts: HashMap::new(),
            cgroups_warned: false,
            held: Vec::new(),
        };
        ctl.reattach();
        ctl.commit();
        Ok(ctl)
    }

    pub fn run(mut self, inbox: Receiver<Event>) {
        loop {
            let event = match inbox.try_recv() {
                Ok(event) => event,
                Err(TryRecvError::Empty) => {
                    self.commit();
                    match inbox.recv() {
                        Ok(event) => event,
                        Err(_) => break,
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            };
            match event {
                Event::Action(action, respond) => self.handle(action, respond),
                Event::Started { name, outcome } => self.started(&name, outcome),
                Event::Ended { name, pid, how } => self.ended(&name, pid, how),
                Event::StopTimeout { name, pid } => self.stop_timeout(&name, pid),
                Event::Exits { name, pid, seen } => {
                    if let Some(r) = self.running.get_mut(&name).filter(|r| r.pid == pid) {
                        r.last_exits = Some(seen);
                    }
                }
            }
            if self.held.len() >= MAX_HELD {
                self.commit();
            }
        }
        self.commit();
    }

    /// Answers now, or after the next commit if changes (or earlier replies) wait for it.
    fn reply(&mut self, respond: Responder, reply: Result<PoolReply, PoolError>) {
        if self.store.has_pending() || !self.held.is_empty() {
            self.held.push((respond, reply));
        } else {
            respond(reply);
        }
    }

    /// Makes the changes since the last commit durable, then sends the replies held for it. If
    /// the commit fails, those replies become the error: what they acknowledge is not on disk.
    fn commit(&mut self) {
        let committed = self.store.commit().map_err(|e| error(500, e.to_string()));
        if let Err(e) = &committed {
            tracing::error!("{}", e.message);
        }
        for (respond, reply) in std::mem::take(&mut self.held) {
            respond(match (&committed, reply) {
                (Err(e), Ok(_)) => Err(e.clone()),
                (_, reply) => reply,
            });
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

    fn handle(&mut self, action: PoolAction, respond: Responder) {
        let reply = match action {
            // Answered when the start is committed (or failed).
            PoolAction::Start(name) => return self.start(&name, StartedBy::Api(respond)),
            PoolAction::Create(spec) => self.create(*spec),
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
        };
        self.reply(respond, reply);
    }

    fn record(&self, name: &str) -> Result<&VmRecord, PoolError> {
        self.records
            .get(name)
            .ok_or_else(|| error(404, format!("no VM named '{name}' (see 'hyperpool ls')")))
    }

    fn record_reply(&self, name: &str) -> PoolReply {
        PoolReply::Record(Box::new(self.records[name].clone()))
    }

    /// Stores a changed record (durable at the next commit) and keeps the copy in memory.
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

    /// Admits a start and hands its slow part to a launch thread; `by` hears the result.
    fn start(&mut self, name: &str, by: StartedBy) {
        match self.begin_start(name) {
            Ok(launch) => {
                if let Err(e) = launch::start(launch, self.events.clone()) {
                    let e = error(500, format!("{name}: starting its launch thread: {e}"));
                    self.finish_start(name, by, Err(e));
                } else {
                    self.starting.insert(name.to_string(), by);
                }
            }
            Err(e) => self.finish_start(name, by, Err(e)),
        }
    }

    fn begin_start(&mut self, name: &str) -> Result<Launch, PoolError> {
        let record = self.record(name)?.clone();
        if self.running.contains_key(name) {
            return Err(error(409, format!("{name} is already running")));
        }
        self.refuse_if_starting(name)?;
        self.settings
            .capacity
            .admit(self.usage(Some(name)), &record.spec)
            .map_err(|e| error(409, format!("{name}: {e}")))?;
        Ok(Launch {
            spec: record.spec,
            layout: self.settings.layout.clone(),
            vmm_binary: self.settings.vmm_binary.clone(),
        })
    }

    /// A launch thread reports: commit the running VM, or pass on why it did not start.
    fn started(&mut self, name: &str, outcome: Result<Launched, PoolError>) {
        let Some(by) = self.starting.remove(name) else {
            return;
        };
        let result = outcome.and_then(|launched| self.commit_start(name, launched, &by));
        self.finish_start(name, by, result);
    }

    fn commit_start(
        &mut self,
        name: &str,
        launched: Launched,
        by: &StartedBy,
    ) -> Result<(), PoolError> {
        if let Some(e) = launched.cgroup_warning
            && !self.cgroups_warned
        {
            tracing::warn!("{e}; VMs run without cgroup limits");
            self.cgroups_warned = true;
        }
        let pid = launched.pid;
        self.running.insert(
            name.to_string(),
            Running {
                pid,
                stopping: false,
                last_exits: None,
            },
        );
        let mut record = self.record(name)?.clone();
        record.status = VmStatus::Running;
        record.pid = Some(pid);
        record.started_at_ms = Some(now_ms());
        if matches!(by, StartedBy::Policy) {
            record.restarts += 1;
        }
        tracing::info!("{name}: started (VMM pid {pid})");
        self.save(record)
    }

    fn finish_start(&mut self, name: &str, by: StartedBy, result: Result<(), PoolError>) {
        match by {
            StartedBy::Api(respond) => {
                let reply = result.map(|()| self.record_reply(name));
                self.reply(respond, reply);
            }
            StartedBy::Policy => match result {
                Ok(()) => tracing::info!("{name}: restarted by its policy"),
                Err(e) => tracing::error!("{name}: restart failed: {}", e.message),
            },
        }
    }

    /// What the VMs that hold resources (running, paused, or starting) have been given, but
    /// for `except`.
    fn usage(&self, except: Option<&str>) -> Usage {
        self.records
            .values()
            .filter(|r| Some(r.spec.name.as_str()) != except)
            .filter(|r| pool::holds_resources(r) || self.starting.contains_key(&r.spec.name))
            .map(|r| &r.spec)
            .collect()
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
        self.refuse_if_starting(name)?;
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

    /// A VM whose start is under way takes no other action until the start is done.
    fn refuse_if_starting(&self, name: &str) -> Result<(), PoolError> {
        if self.starting.contains_key(name) {
            return Err(error(
                409,
                format!("{name} is starting; try again once it runs"),
            ));
        }
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<PoolReply, PoolError> {
        self.record(name)?;
        self.refuse_if_starting(name)?;
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
        self.start(name, StartedBy::Policy);
    }

    /// The record; for a running VM also where its live figures are (gathered by the caller,
    /// off this thread).
    fn inspect(&self, name: &str) -> Result<PoolReply, PoolError> {
        let record = self.record(name)?.clone();
        let running = self.running.get(name);
        let source = running.map(|r| LiveSource {
            pid: r.pid,
            socket: self.settings.layout.api_socket(name),
            previous: r.last_exits,
            started_at_ms: record.started_at_ms,
        });
        let console_socket = running.map(|_| {
            self.settings
                .layout
                .console_socket(name)
                .display()
                .to_string()
        });
        let details = VmDetails {
            console_socket,
            record,
            live: None,
        };
        Ok(PoolReply::Details(Box::new(details), source))
    }

    fn pool_info(&self) -> PoolInfo {
        self.settings.capacity.info(
            self.usage(None),
            self.records.len() as u32,
            pool::disk_space(&self.settings.layout.state_dir),
        )
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
