//! The slow part of starting a VM, run on a thread of its own so that starts overlap and the
//! controller stays free: disk overlays, the VMM process, its cgroup, `vm.create` and
//! `vm.boot`. The thread then reports the result to the controller (which commits it, or not)
//! and, for a VMM that runs, stays as its watcher.

use std::path::PathBuf;
use std::process::Child;
use std::sync::mpsc::Sender;

use hyperpool_api::pool::VmSpec;

use crate::cgroup::VmCgroup;
use crate::controller::{Event, PoolError};
use crate::layout::Layout;
use crate::{overlay, spec, vmm_process};

/// What a start needs, taken from the controller's state when the start was admitted.
pub struct Launch {
    pub spec: VmSpec,
    pub layout: Layout,
    pub vmm_binary: PathBuf,
}

/// A VMM that booted its guest.
pub struct Launched {
    pub pid: u32,
    /// Why the VM runs without a cgroup, when it does (placement was not asked for).
    pub cgroup_warning: Option<String>,
}

/// Starts the VM on a new thread, which sends [`Event::Started`] and then, if the VMM runs,
/// [`Event::Ended`] when it is gone.
pub fn start(launch: Launch, events: Sender<Event>) -> std::io::Result<()> {
    let name = launch.spec.name.clone();
    std::thread::Builder::new()
        .name(format!("watch-{name}"))
        .spawn(move || match run(&launch) {
            Ok((child, cgroup_warning)) => {
                let pid = child.id();
                let started = Event::Started {
                    name: name.clone(),
                    outcome: Ok(Launched {
                        pid,
                        cgroup_warning,
                    }),
                };
                // A controller that is gone commits nothing; the VMM then just runs on, as
                // VMMs do when the daemon stops.
                if events.send(started).is_ok() {
                    let how = vmm_process::wait_child(child);
                    let _ = events.send(Event::Ended { name, pid, how });
                }
            }
            Err(e) => {
                let _ = events.send(Event::Started {
                    name,
                    outcome: Err(e),
                });
            }
        })
        .map(|_| ())
}

/// Overlays, VMM, cgroup, vm.create, vm.boot; a VMM that fails half-way is killed and reaped.
fn run(l: &Launch) -> Result<(Child, Option<String>), PoolError> {
    let name = &l.spec.name;
    let dir = l.layout.vm_dir(name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| PoolError::new(500, format!("creating {}: {e}", dir.display())))?;
    for (i, d) in l.spec.disks.iter().enumerate() {
        if let Some(base) = &d.base {
            let overlay_path = l.layout.overlay(name, i);
            if !crate::layout::exists(&overlay_path) {
                overlay::create(std::path::Path::new(base), &overlay_path)
                    .map_err(|e| PoolError::new(400, format!("{name}: disks[{i}]: {e}")))?;
            }
        }
    }
    let cfg = spec::vm_config(&l.spec, &l.layout).map_err(|e| PoolError::new(400, e))?;
    let body = serde_json::to_value(&cfg).map_err(|e| PoolError::new(500, e.to_string()))?;
    let socket = l.layout.api_socket(name);
    let mut child = vmm_process::spawn(&l.vmm_binary, &socket, &l.layout.vmm_log(name))
        .map_err(|e| PoolError::new(500, format!("{name}: {e}")))?;
    let fail = |child: &mut Child, status: u16, message: String| {
        let _ = child.kill();
        let _ = child.wait();
        VmCgroup::remove(name);
        PoolError::new(status, message)
    };
    // Into the cgroup before vm.create, so the guest's memory is charged to it from the start.
    let cgroup_warning = match VmCgroup::place(&l.spec, child.id()) {
        Ok(()) => None,
        // The user asked for placement: running without it would be a lie.
        Err(e) if l.spec.placement.is_some() => {
            return Err(fail(&mut child, 500, format!("{name}: {e}")));
        }
        Err(e) => Some(e),
    };
    let configured =
        vmm_process::put_in_order(&socket, &[("vm.create", Some(&body)), ("vm.boot", None)]);
    if let Err(e) = configured {
        // A VMM that died at start says more in its log than the broken connection does.
        let message = match child.try_wait() {
            Ok(Some(status)) => format!(
                "{name}: the VMM exited at start ({status}); see {}",
                l.layout.vmm_log(name).display()
            ),
            _ => format!("{name}: {e}"),
        };
        return Err(fail(&mut child, 400, message));
    }
    Ok((child, cgroup_warning))
}
