//! The pool's REST API: JSON over HTTP/1.1 on a Unix socket (mode 0600) and optionally on TCP
//! behind a bearer token. Handlers only translate requests into [`PoolAction`]s.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyperpool_api::pool::{ApiError, VmSpec, VmStatus};

use crate::controller::{Event, PoolAction, PoolError, PoolReply};
use crate::layout::Layout;

/// The OpenAPI document of this API, served at `/v1/openapi.yaml`.
pub const OPENAPI: &str = include_str!("../../../docs/pool-api.yaml");

#[derive(Clone)]
pub struct AppState {
    pub events: Sender<Event>,
    pub layout: Layout,
    pub stop_timeout: Duration,
}

/// Every route, as (method, path) in axum's syntax; the OpenAPI test holds the document to it.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{name}"),
    ("DELETE", "/v1/vms/{name}"),
    ("POST", "/v1/vms/{name}/start"),
    ("POST", "/v1/vms/{name}/stop"),
    ("POST", "/v1/vms/{name}/kill"),
    ("POST", "/v1/vms/{name}/pause"),
    ("POST", "/v1/vms/{name}/resume"),
    ("POST", "/v1/vms/{name}/restart"),
    ("GET", "/v1/vms/{name}/logs"),
    ("GET", "/v1/pool"),
    ("GET", "/v1/openapi.yaml"),
    ("GET", "/metrics"),
];

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(inspect).delete(delete))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/kill", post(kill))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/restart", post(restart))
        .route("/v1/vms/{name}/logs", get(logs))
        .route("/v1/pool", get(pool))
        .route("/v1/openapi.yaml", get(openapi))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint (see /v1/openapi.yaml)",
            )
        })
        .with_state(state)
}

/// Refuses requests without `Authorization: Bearer <token>` (for the TCP listener).
pub async fn require_token(token: String, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit so the time taken says nothing about the token.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        next.run(request).await
    } else {
        error(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

async fn act(state: &AppState, action: PoolAction) -> Result<PoolReply, Response> {
    let (reply_to, reply) = tokio::sync::oneshot::channel();
    let respond: crate::controller::Responder = Box::new(move |r| {
        let _ = reply_to.send(r);
    });
    if state.events.send(Event::Action(action, respond)).is_err() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        ));
    }
    match reply.await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(PoolError { status, message })) => Err(error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message,
        )),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        )),
    }
}

fn respond(reply: PoolReply) -> Response {
    match reply {
        PoolReply::Done => StatusCode::NO_CONTENT.into_response(),
        PoolReply::Record(r) => axum::Json(r).into_response(),
        PoolReply::Details(d, _) => axum::Json(d).into_response(),
        PoolReply::List(l) => axum::Json(l).into_response(),
        PoolReply::Pool(p) => axum::Json(p).into_response(),
        PoolReply::Text(t) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], t).into_response()
        }
    }
}

async fn run(state: &AppState, action: PoolAction) -> Response {
    match act(state, action).await {
        Ok(reply) => respond(reply),
        Err(e) => e,
    }
}

async fn list(State(s): State<AppState>) -> Response {
    run(&s, PoolAction::List).await
}

#[derive(serde::Deserialize)]
struct CreateQuery {
    #[serde(default)]
    start: bool,
}

async fn create(State(s): State<AppState>, Query(q): Query<CreateQuery>, body: Bytes) -> Response {
    let mut json = serde_json::Deserializer::from_slice(&body);
    let spec: VmSpec = match serde_path_to_error::deserialize(&mut json) {
        Ok(spec) => spec,
        Err(e) if e.path().to_string() == "." => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid VM spec: {}", e.inner()),
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid VM spec: field `{}`: {}", e.path(), e.inner()),
            );
        }
    };
    let name = spec.name.clone();
    let created = match act(&s, PoolAction::Create(Box::new(spec))).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    if !q.start {
        return (StatusCode::CREATED, respond(created)).into_response();
    }
    match act(&s, PoolAction::Start(name)).await {
        Ok(r) => (StatusCode::CREATED, respond(r)).into_response(),
        Err(e) => e,
    }
}

/// The record from the controller; a running VM's live figures gathered here, on a blocking
/// thread, so inspects of different VMs wait on their VMMs side by side.
async fn inspect(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let (mut details, source) = match act(&s, PoolAction::Inspect(name.clone())).await {
        Ok(PoolReply::Details(d, source)) => (d, source),
        Ok(other) => return respond(other),
        Err(e) => return e,
    };
    if let Some(source) = source {
        let pid = source.pid;
        if let Ok((live, seen)) = tokio::task::spawn_blocking(move || source.collect()).await {
            details.live = Some(live);
            let _ = s.events.send(Event::Exits { name, pid, seen });
        }
    }
    axum::Json(details).into_response()
}

async fn delete(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    run(&s, PoolAction::Delete(name)).await
}

async fn start(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    run(&s, PoolAction::Start(name)).await
}

/// Presses the power button and answers once the VM has stopped (the daemon forces it after
/// its stop timeout).
async fn stop(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    if let Err(e) = act(&s, PoolAction::Stop(name.clone())).await {
        return e;
    }
    wait_not_running(&s, &name).await
}

async fn kill(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    if let Err(e) = act(&s, PoolAction::Kill(name.clone())).await {
        return e;
    }
    wait_not_running(&s, &name).await
}

async fn wait_not_running(s: &AppState, name: &str) -> Response {
    let deadline = Instant::now() + s.stop_timeout + Duration::from_secs(10);
    loop {
        match act(s, PoolAction::Inspect(name.to_string())).await {
            Ok(PoolReply::Details(d, _))
                if !matches!(d.record.status, VmStatus::Running | VmStatus::Paused) =>
            {
                return axum::Json(d.record).into_response();
            }
            Ok(_) => {}
            Err(e) => return e,
        }
        if Instant::now() > deadline {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("{name} has not stopped yet"),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn pause(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    run(&s, PoolAction::Pause(name)).await
}

async fn resume(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    run(&s, PoolAction::Resume(name)).await
}

async fn restart(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    run(&s, PoolAction::Restart(name)).await
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    /// At most this many bytes from the end.
    bytes: Option<u64>,
}

/// The VM's console log (the older, rotated part first when it is needed to fill `bytes`).
async fn logs(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    if let Err(e) = act(&s, PoolAction::Inspect(name.clone())).await {
        return e;
    }
    let path = s.layout.console_log(&name);
    let mut old = path.clone().into_os_string();
    old.push(".1");
    let mut text = std::fs::read(&old).unwrap_or_default();
    text.extend(std::fs::read(&path).unwrap_or_default());
    if let Some(n) = q.bytes {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if text.len() > n {
            text.drain(..text.len() - n);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

async fn pool(State(s): State<AppState>) -> Response {
    run(&s, PoolAction::Pool).await
}

async fn metrics(State(s): State<AppState>) -> Response {
    run(&s, PoolAction::Metrics).await
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}
