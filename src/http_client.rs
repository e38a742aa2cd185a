//! A minimal HTTP/1.1 client for the CLI's calls to the gateway (token endpoint, publish API).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
    #[error("the gateway at {url} did not answer within {timeout}")]
    Timeout { url: String, timeout: String },
    #[error("the gateway's response from {url} is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge { url: String },
}

/// Sends one request and returns the status and body.
pub async fn request(
    method: Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), HttpError> {
    let uri: hyper::Uri =
        url.parse().map_err(
            |error: hyper::http::uri::InvalidUri| HttpError::InvalidUrl {
                url: url.to_owned(),
                reason: error.to_string(),
            },
        )?;
    if uri.scheme_str() != Some("http") {
        // NOTE: https gateway URLs need a TLS connector here; the CLI reaches the gateway over plain HTTP only.
        return Err(HttpError::InvalidUrl {
            url: url.to_owned(),
            reason: "only http:// URLs are supported by the CLI".to_owned(),
        });
    }
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(key) = bearer {
        let value =
            HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| HttpError::InvalidUrl {
                url: url.to_owned(),
                reason: "the API key contains characters not allowed in an HTTP header".to_owned(),
            })?;
        builder = builder.header(header::AUTHORIZATION, value);
    }
    if body.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|error| HttpError::InvalidUrl {
            url: url.to_owned(),
            reason: error.to_string(),
        })?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let call = async {
        let response = client
            .request(request)
            .await
            .map_err(|error| HttpError::Unreachable {
                url: url.to_owned(),
                reason: error.to_string(),
            })?;
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
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.to_owned(),
            timeout: humantime::format_duration(timeout).to_string(),
        })?
}
