//! A minimal HTTP/1.1 client for the sidecar's admin port (`/metrics`) and HTTP/JSON API,
//! built on hyper, which the gRPC stack already brings in: one connection per request,
//! which is all a CLI and tests need.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why an HTTP request failed (a non-2xx status is not an error here).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP to {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// A response: status and whole body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request and reads the whole response, within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<Response, HttpError> {
    tokio::time::timeout(timeout, request_inner(addr, method, path, headers, body))
        .await
        .unwrap_or(Err(HttpError::Timeout { addr, timeout }))
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Response, HttpError> {
    let http = |source| HttpError::Http { addr, source };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = sender
        .send_request(builder.body(Full::new(body))?)
        .await
        .map_err(http)?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    Ok(Response { status, body })
}

/// `GET path`, with a 5 s timeout.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response, HttpError> {
    request(addr, "GET", path, &[], Bytes::new(), Duration::from_secs(5)).await
}

/// `POST path` with a JSON body, with a 10 s timeout.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: impl Into<Bytes>,
) -> Result<Response, HttpError> {
    request(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        body.into(),
        Duration::from_secs(10),
    )
    .await
}
