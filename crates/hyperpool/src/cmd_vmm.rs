//! `hyperpool vmm --api-socket PATH`: one VM process driven over Cloud Hypervisor's REST API on
//! a Unix socket. The HTTP side only translates: each request becomes a
//! [`control::Action`], the controller (on the main thread) does it, the reply becomes a response.
//! File descriptors sent with a request (SCM_RIGHTS, see `fd_stream.rs`) go with `vm.create` and
//! `vm.add-net` (TAP queues for `fds`); any other request's are closed.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::Request;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use hyper::body::Incoming;
use hyperpool_api as api;
use hyperpool_vmm::control::{self, Action, ActionError, Event, Reply};
use hyperpool_vmm::run::Outcome;
use serde::de::DeserializeOwned;

use crate::Failure;
use crate::cli::VmmArgs;
use crate::fd_stream::{FdStream, ReceivedFds};

pub fn run(args: VmmArgs, start: Instant) -> Result<u8, Failure> {
    let path = socket_path(&args.api_socket);
    let listener = match args.api_fd {
        Some(fd) => inherited(fd, &path)?,
        None => bind(&path)?,
    };
    let (events, inbox) = std::sync::mpsc::channel();
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let events = events.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve_http(listener, events, stopped))
            .map_err(|e| Failure::runtime(format!("starting the API thread: {e}")))?
    };
    tracing::info!("API on {}", path.display());
    if let Some(dir) = path.parent() {
        hyperpool_vmm::device_processes::place_sockets_in(
            dir.join(format!("devices-{}", std::process::id())),
        );
    }
    let result = control::serve(events, inbox, start);
    hyperpool_vmm::device_processes::stop_all();
    // Let the last response (e.g. to vmm.shutdown) leave before the process ends.
    let _ = stop_server.send(());
    let deadline = Instant::now() + Duration::from_secs(2);
    while !server.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(&path);
    match result {
        Ok(Outcome::GuestFatal(why)) => {
            eprintln!("hyperpool: the guest crashed: {why}");
            Ok(Outcome::GuestFatal(why).exit_code() as u8)
        }
        Ok(outcome) => {
            tracing::info!("VMM ends: {outcome:?}");
            Ok(outcome.exit_code() as u8)
        }
        Err(e) if e.is_user_error() => Err(Failure::usage(e.to_string())),
        Err(e) => Err(Failure::runtime(e.to_string())),
    }
}

/// Cloud Hypervisor accepts `--api-socket path=PATH` as well as a bare path.
fn socket_path(arg: &str) -> PathBuf {
    PathBuf::from(arg.strip_prefix("path=").unwrap_or(arg))
}

/// Binds the API socket (mode 0600: the API is as powerful as the process), replacing a stale
/// socket file but never any other file.
fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, Failure> {
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Failure::usage(format!(
                "--api-socket {shown}: exists and is not a socket; choose another path"
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Failure::usage(format!(
                "--api-socket {shown}: another process is serving on it"
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| Failure::usage(format!("--api-socket {shown}: {e}")))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Failure::runtime(format!("--api-socket {shown}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Failure::runtime(format!("--api-socket {shown}: {e}")))?;
    Ok(listener)
}

/// Takes over the listening socket a parent bound to `path` and left open as `fd`.
fn inherited(fd: RawFd, path: &Path) -> Result<std::os::unix::net::UnixListener, Failure> {
    let wrong = |why: &str| {
        Failure::usage(format!(
            "--api-fd {fd}: {why}; pass a listening Unix socket bound to {}",
            path.display()
        ))
    };
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails (EBADF) if `fd` is not open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(wrong("not an open file descriptor"));
    }
    // SAFETY: `fd` is open (checked above) and this process does not use it otherwise: it was
    // inherited to be the API socket, and `--api-fd` is read once, so there is one owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let sock = socket2::SockRef::from(&owned);
    let bound = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    if bound.as_deref() != Some(path) || !sock.is_listener().unwrap_or(false) {
        return Err(wrong("not a listening socket bound to --api-socket"));
    }
    let listener = std::os::unix::net::UnixListener::from(owned);
    listener
        .set_nonblocking(true)
        .map_err(|e| Failure::runtime(format!("--api-fd {fd}: {e}")))?;
    Ok(listener)
}

fn serve_http(
    listener: std::os::unix::net::UnixListener,
    events: Sender<Event>,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("API runtime: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("API socket: {e}");
                return;
            }
        };
        let app = Router::new().fallback(dispatch).with_state(events);
        serve_connections(listener, app, stopped).await;
    });
}

/// Accepts API connections until `stopped`, each served by hyper over an [`FdStream`] whose
/// received fds go with each request (as an extension); then gives open connections a moment
/// to send their last responses.
async fn serve_connections(
    listener: tokio::net::UnixListener,
    app: Router,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("API socket: accept: {e}");
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let fds = ReceivedFds::default();
        let io = hyper_util::rt::TokioIo::new(FdStream::new(stream, fds.clone()));
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(fds.clone());
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, req).await }
        });
        connections.spawn(async move {
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("API connection: {e}");
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// Routes by endpoint name (`/api/v1/<name>`), Cloud Hypervisor's layout.
async fn dispatch(
    State(events): State<Sender<Event>>,
    Extension(received): Extension<ReceivedFds>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    // The whole body is in, so are the fds sent with it; fds no action takes are closed here.
    let fds = received.take();
    let Some(name) = uri
        .path()
        .strip_prefix(api::API_PREFIX)
        .and_then(|p| p.strip_prefix('/'))
    else {
        return text(StatusCode::NOT_FOUND, format!("no endpoint {}", uri.path()));
    };
    let action = match action(method.as_str(), name, &body, fds) {
        Ok(action) => action,
        Err((status, message)) => return text(status, message),
    };
    let (reply_to, reply) = tokio::sync::oneshot::channel();
    let respond: control::Responder = Box::new(move |r| {
        let _ = reply_to.send(r);
    });
    if events.send(Event::Api(action, respond)).is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the VMM is shutting down");
    }
    match reply.await {
        Ok(Ok(reply)) => to_response(reply),
        Ok(Err(ActionError { status, message })) => text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message,
        ),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "the VMM is shutting down"),
    }
}

/// The action an API request asks for, or why there is none.
fn action(
    method: &str,
    name: &str,
    body: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Action, (StatusCode, String)> {
    Ok(match (method, name) {
        ("GET", "vmm.ping") => Action::Ping,
        ("PUT", "vmm.shutdown") => Action::VmmShutdown,
        ("PUT", "vm.create") => Action::Create(Box::new(json(body)?), fds),
        ("PUT", "vm.boot") => Action::Boot,
        ("GET", "vm.info") => Action::Info,
        ("GET", "vm.counters") => Action::Counters,
        ("PUT", "vm.pause") => Action::Pause,
        ("PUT", "vm.resume") => Action::Resume,
        ("PUT", "vm.shutdown") => Action::Shutdown,
        ("PUT", "vm.reboot") => Action::Reboot,
        ("PUT", "vm.power-button") => Action::PowerButton,
        ("PUT", "vm.delete") => Action::Delete,
        ("PUT", "vm.add-disk") => Action::AddDisk(Box::new(json(body)?)),
        ("PUT", "vm.add-net") => Action::AddNet(Box::new(json(body)?), fds),
        ("PUT", "vm.remove-device") => Action::RemoveDevice(json::<api::VmRemoveDevice>(body)?.id),
        (_, name) if KNOWN.contains(&name) => {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{name} does not take {method}"),
            ));
        }
        (_, name) if NOT_YET.contains(&name) => {
            return Err((
                StatusCode::NOT_FOUND,
                format!("{name} is not supported by Hyperpool yet"),
            ));
        }
        (_, name) => return Err((StatusCode::NOT_FOUND, format!("no endpoint {name}"))),
    })
}

const KNOWN: &[&str] = &[
    "vmm.ping",
    "vmm.shutdown",
    "vm.create",
    "vm.boot",
    "vm.info",
    "vm.counters",
    "vm.pause",
    "vm.resume",
    "vm.shutdown",
    "vm.reboot",
    "vm.power-button",
    "vm.delete",
    "vm.add-disk",
    "vm.add-net",
    "vm.remove-device",
];

/// Cloud Hypervisor endpoints Hyperpool does not serve yet: named, not just "not found".
const NOT_YET: &[&str] = &[
    "vmm.info",
    "vm.balloon-stats",
    "vm.resize",
    "vm.resize-disk",
    "vm.resize-zone",
    "vm.add-device",
    "vm.add-fs",
    "vm.add-generic-vhost-user",
    "vm.add-pmem",
    "vm.add-vsock",
    "vm.add-vdpa",
    "vm.add-user-device",
    "vm.snapshot",
    "vm.coredump",
    "vm.nmi",
    "vm.restore",
    "vm.receive-migration",
    "vm.send-migration",
];

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, (StatusCode, String)> {
    serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    let mut line = message.into();
    line.push('\n');
    (status, line).into_response()
}

fn to_response(reply: Reply) -> Response {
    let body = match reply {
        Reply::Done => return StatusCode::NO_CONTENT.into_response(),
        Reply::Ping(p) => serde_json::to_vec(&p),
        Reply::Info(i) => serde_json::to_vec(&i),
        Reply::Counters(c) => serde_json::to_vec(&c),
        Reply::PciDevice(d) => serde_json::to_vec(&d),
    };
    match body {
        Ok(body) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
