//! The Hyperpool pool daemon (`hyperpool serve`): owns the host's CPUs, memory and disk space,
//! runs one sandboxed VMM process per VM, keeps its state in an embedded database and serves a
//! REST API. It never maps guest memory: VMs are other processes.

mod cgroup;
mod controller;
mod launch;
mod layout;
mod live;
mod metrics;
mod overlay;
mod pool;
mod server;
mod spec;
mod store;
mod vmm_process;

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

pub use layout::Layout;
pub use server::{OPENAPI, ROUTES};

pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Also serve on TCP, requiring this bearer token.
    pub tcp: Option<(SocketAddr, String)>,
    pub vmm_binary: PathBuf,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub stop_timeout: Duration,
}

/// A failure to start the daemon; `usage` ones are the user's to fix (exit 2).
#[derive(Debug)]
pub struct DaemonError {
    pub usage: bool,
    pub message: String,
}

fn usage(message: String) -> DaemonError {
    DaemonError {
        usage: true,
        message,
    }
}

fn runtime(message: String) -> DaemonError {
    DaemonError {
        usage: false,
        message,
    }
}

/// Runs the daemon until SIGTERM/SIGINT. VMs keep running when it ends; the next daemon on the
/// same state directory takes them over.
pub fn serve(cfg: DaemonConfig) -> Result<(), DaemonError> {
    if !(cfg.cpu_overcommit > 0.0 && cfg.memory_overcommit > 0.0) {
        return Err(usage(
            "--cpu-overcommit and --memory-overcommit must be positive".into(),
        ));
    }
    let layout = Layout {
        state_dir: cfg.state_dir.clone(),
    };
    layout::create_vms_dir(&layout)
        .map_err(|e| usage(format!("--state-dir {}: {e}", layout.state_dir.display())))?;
    layout::check_socket_room(&layout).map_err(usage)?;
    let _lock = lock_state_dir(&layout)?;
    let store = store::Store::open(&layout.database()).map_err(|e| runtime(e.to_string()))?;

    let (events, inbox) = std::sync::mpsc::channel();
    let settings = controller::Settings {
        layout: layout.clone(),
        vmm_binary: cfg.vmm_binary.clone(),
        capacity: pool::Capacity::of_host(cfg.cpu_overcommit, cfg.memory_overcommit),
        stop_timeout: cfg.stop_timeout,
    };
    let ctl = controller::Controller::new(settings, store, events.clone()).map_err(runtime)?;
    std::thread::Builder::new()
        .name("pool".into())
        .spawn(move || ctl.run(inbox))
        .map_err(|e| runtime(format!("starting the controller: {e}")))?;

    let state = server::AppState {
        events,
        layout,
        stop_timeout: cfg.stop_timeout,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| runtime(format!("starting the runtime: {e}")))?;
    rt.block_on(serve_http(cfg, state))
}

/// One daemon per state directory.
fn lock_state_dir(layout: &Layout) -> Result<File, DaemonError> {
    let path = layout.lock_file();
    let file = File::create(&path).map_err(|e| usage(format!("{}: {e}", path.display())))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an fd we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(usage(format!(
            "another hyperpool daemon uses --state-dir {}",
            layout.state_dir.display()
        )));
    }
    Ok(file)
}

async fn serve_http(cfg: DaemonConfig, state: server::AppState) -> Result<(), DaemonError> {
    let socket = &cfg.socket;
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(usage(format!(
                "--socket {}: exists and is not a socket",
                socket.display()
            )));
        }
        let _ = std::fs::remove_file(socket);
    }
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let unix = tokio::net::UnixListener::bind(socket)
        .map_err(|e| usage(format!("--socket {}: {e}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| runtime(format!("--socket {}: {e}", socket.display())))?;
    let app = server::router(state);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| runtime(format!("installing the SIGTERM handler: {e}")))?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tracing::info!("pool API on {}", socket.display());
    if let Some((addr, token)) = cfg.tcp.clone() {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| usage(format!("--listen {addr}: {e}")))?;
        let guarded = app
            .clone()
            .layer(axum::middleware::from_fn(move |req, next| {
                server::require_token(token.clone(), req, next)
            }));
        tracing::info!("pool API on tcp {addr} (bearer token required)");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, guarded).await {
                tracing::error!("TCP API: {e}");
            }
        });
    }
    let result = axum::serve(unix, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| runtime(format!("API server: {e}")));
    let _ = std::fs::remove_file(socket);
    tracing::info!("daemon stopped; VMs keep running");
    result
}
