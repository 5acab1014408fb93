//! A small blocking client for Hyperpool's (and Cloud Hypervisor's) REST APIs on Unix sockets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// What the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim_end().to_string()
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

#[derive(Debug)]
pub enum ClientError {
    /// Nobody serves on the socket (or it does not exist).
    Connect(PathBuf, std::io::Error),
    Http(String),
    Timeout,
    Decode(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(p, e) => write!(f, "cannot connect to {}: {e}", p.display()),
            Self::Http(e) => write!(f, "HTTP error: {e}"),
            Self::Timeout => write!(f, "no answer in time"),
            Self::Decode(e) => write!(f, "unexpected answer: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None)
    }

    pub fn put(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, ClientError> {
        self.request("PUT", path, body.map(|b| b.to_string().into_bytes()))
    }

    /// One request on a fresh connection.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let mut answers = self
            .in_order(vec![Request { method, path, body }])
            .map_err(|e| e.error)?;
        Ok(answers.remove(0))
    }

    /// Several requests, one after another on one connection: what a caller with a few things
    /// to say at once (the daemon's `vm.create` then `vm.boot`) pays for one connection and one
    /// runtime instead of one each. Stops at the first answer that is not a success, which is
    /// then the last one returned. Each request has the whole timeout, as it would alone; an
    /// error names the request it stopped at.
    pub fn in_order(&self, requests: Vec<Request<'_>>) -> Result<Vec<Response>, InOrderError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| InOrderError::new(&requests, 0, ClientError::Http(e.to_string())))?;
        runtime.block_on(self.send_all(&requests))
    }

    async fn send_all(&self, requests: &[Request<'_>]) -> Result<Vec<Response>, InOrderError> {
        let fail = |at: usize| move |e: ClientError| InOrderError::new(requests, at, e);
        let http = |e: hyper::Error| ClientError::Http(e.to_string());
        let timed = |at: usize| move |_| InOrderError::new(requests, at, ClientError::Timeout);
        let stream = tokio::time::timeout(self.timeout, async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| ClientError::Connect(self.socket.clone(), e))?;
            hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(http)
        })
        .await
        .map_err(timed(0))?;
        let (mut sender, connection) = stream.map_err(fail(0))?;
        tokio::spawn(connection);
        let mut answers = Vec::with_capacity(requests.len());
        for (at, Request { method, path, body }) in requests.iter().enumerate() {
            let answer = tokio::time::timeout(self.timeout, async {
                // The previous answer was read in full, so the connection takes the next one.
                sender.ready().await.map_err(http)?;
                let mut request = hyper::Request::builder()
                    .method(*method)
                    .uri(*path)
                    .header(hyper::header::HOST, "localhost");
                if body.is_some() {
                    request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                }
                let request = request
                    .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))
                    .map_err(|e| ClientError::Http(e.to_string()))?;
                let response = sender.send_request(request).await.map_err(http)?;
                let status = response.status().as_u16();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(http)?
                    .to_bytes()
                    .to_vec();
                Ok::<_, ClientError>(Response { status, body })
            })
            .await
            .map_err(timed(at))?
            .map_err(fail(at))?;
            let failed = !answer.is_success();
            answers.push(answer);
            if failed {
                break;
            }
        }
        Ok(answers)
    }
}

/// Why [`Client::in_order`] stopped without an answer: the request it was at and the error.
#[derive(Debug)]
pub struct InOrderError {
    /// The path of the request that got no answer.
    pub path: String,
    pub error: ClientError,
}

impl InOrderError {
    fn new(requests: &[Request<'_>], at: usize, error: ClientError) -> Self {
        let path = requests.get(at).map_or("", |r| r.path).to_string();
        Self { path, error }
    }
}

impl std::fmt::Display for InOrderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.error)
    }
}

impl std::error::Error for InOrderError {}

/// One request of [`Client::in_order`].
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub body: Option<Vec<u8>>,
}
