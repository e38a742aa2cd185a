//! A minimal HTTP/1.1 client for the CLI's calls to the gateway (token endpoint, publish API), over http or
//! https. Each request opens its own connection.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::task::AbortOnDropHandle;

use crate::tls::{self, ClientTls};

/// Maximum size of a response body read by the CLI, in bytes.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// A failed HTTP call.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "cannot reach the gateway at {url}: {reason}; check --server and that `wsgw serve` runs"
    )]
    Unreachable { url: String, reason: String },
    #[error("TLS handshake with {url} failed: {reason}")]
    Tls { url: String, reason: String },
    #[error("the gateway at {url} did not answer within {timeout}")]
    Timeout { url: String, timeout: String },
    #[error("the gateway's response from {url} is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge { url: String },
}

/// Sends one request and returns the status and body; https URLs trust the webpki roots only.
pub async fn request(
    method: Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), HttpError> {
    request_with_tls(method, url, bearer, body, timeout, &ClientTls::default()).await
}

/// Sends one request to an http or https URL and returns the status and body. For https the server's
/// certificate must chain to a root that `tls` trusts. `timeout` covers connecting, TLS and the whole response.
pub async fn request_with_tls(
    method: Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
    timeout: Duration,
    tls: &ClientTls,
) -> Result<(StatusCode, Bytes), HttpError> {
    let invalid = |reason: String| HttpError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|error: hyper::http::uri::InvalidUri| invalid(error.to_string()))?;
    let secure = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(invalid(
                "the URL must start with http:// or https://".to_owned(),
            ));
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| invalid("the URL has no host".to_owned()))?;
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let host_header = match uri.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    // hyper::Uri keeps the brackets around an IPv6 address; connecting and TLS need the bare address.
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let path = uri
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_owned();

    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host_header);
    if let Some(key) = bearer {
        let value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            invalid("the API key contains characters not allowed in an HTTP header".to_owned())
        })?;
        builder = builder.header(header::AUTHORIZATION, value);
    }
    if body.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|error| invalid(error.to_string()))?;

    let call = async {
        let unreachable = |reason: String| HttpError::Unreachable {
            url: url.to_owned(),
            reason,
        };
        let stream = TcpStream::connect((bare_host.as_str(), port))
            .await
            .map_err(|error| unreachable(error.to_string()))?;
        let _ = stream.set_nodelay(true);
        if !secure {
            return exchange(stream, request, url, false).await;
        }
        let stream =
            tls.connect(&bare_host, stream)
                .await
                .map_err(|error| match tls::find_rustls_error(&error) {
                    Some(rustls_error) => HttpError::Tls {
                        url: url.to_owned(),
                        reason: tls::describe_handshake_error(rustls_error),
                    },
                    None => unreachable(format!("TLS handshake failed: {error}")),
                })?;
        exchange(stream, request, url, true).await
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.to_owned(),
            timeout: humantime::format_duration(timeout).to_string(),
        })?
}

/// Sends `request` on a fresh connection (`secure` when it runs over TLS) and reads the whole response.
async fn exchange<S>(
    stream: S,
    request: Request<Full<Bytes>>,
    url: &str,
    secure: bool,
) -> Result<(StatusCode, Bytes), HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let unreachable = |error: hyper::Error| {
        // A TLS server responds to a plain-HTTP request with a TLS alert, which hyper cannot parse.
        let reason = if error.is_parse() && !secure {
            format!(
                "the response is not HTTP ({error}); if the gateway serves TLS, use an https:// URL"
            )
        } else {
            error.to_string()
        };
        HttpError::Unreachable {
            url: url.to_owned(),
            reason,
        }
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(unreachable)?;
    // The connection task reads and writes the socket; dropping the guard (on return or timeout) stops it.
    let _connection = AbortOnDropHandle::new(tokio::spawn(connection));
    let response = sender.send_request(request).await.map_err(unreachable)?;
    let status = response.status();
    let limited = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES);
    let body = limited
        .collect()
        .await
        .map_err(|_| HttpError::TooLarge {
            url: url.to_owned(),
        })?
        .to_bytes();
    Ok((status, body))
}
