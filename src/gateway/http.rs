//! HTTP routes: the token endpoint, the WebSocket upgrade and the health checks.
//!
//! JSON answers have the shape `{"result":0,"description":"ok","data":...}`; on error `result` is the HTTP
//! status code and `description` says what is wrong and what to do. Paths under `/socket/` carry a token, so
//! no log line includes a request path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{debug, info};

use super::Gateway;
use super::admission::AdmissionError;
use super::auth::{self, ClaimError};
use super::session;
use crate::broker::{BrokerError, Publication};
use crate::domain::envelope::{self, unix_millis};
use crate::domain::frame::PROTOCOL_V1;
use crate::domain::{Envelope, SendType};
use crate::domain::{Identity, TokenError};

type HttpResponse = Response<Full<Bytes>>;

/// Dispatches one request.
pub async fn route(
    gateway: Arc<Gateway>,
    remote: SocketAddr,
    permit: Arc<OwnedSemaphorePermit>,
    request: Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let path = request.uri().path().to_owned();
    let response = match (request.method(), path.as_str()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, "ok", None),
        (&Method::GET, "/readyz") => readiness(&gateway),
        (&Method::GET, "/client/v1/wsgw.js") => client_library(
            include_str!("../../clients/js/wsgw.js"),
            "text/javascript; charset=utf-8",
        ),
        (&Method::GET, "/client/v1/wsgw.d.ts") => client_library(
            include_str!("../../clients/js/wsgw.d.ts"),
            "text/plain; charset=utf-8",
        ),
        (&Method::GET, "/metrics") => metrics(&gateway),
        (&Method::GET, "/websocket/token") => {
            let origin = request_origin(&request);
            match foreign_origin(&gateway, &origin) {
                Some(rejection) => rejection,
                None => with_cors(&gateway, &origin, issue_token(&gateway, &request)),
            }
        }
        (&Method::OPTIONS, "/websocket/token") => preflight(&gateway, &request),
        (&Method::POST, "/api/v1/messages") => publish_message(&gateway, request).await,
        (&Method::GET, "/api/v1/sessions") => list_sessions(&gateway, &request),
        (&Method::DELETE, path) if path.starts_with("/api/v1/sessions/") => {
            kick_session(&gateway, &request)
        }
        (&Method::GET, path) if path.starts_with("/socket/") => {
            upgrade(gateway, remote, permit, request).await
        }
        (_, "/healthz" | "/readyz" | "/websocket/token" | "/metrics") => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; use GET".to_owned(),
        ),
        (_, "/api/v1/messages") => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; use POST".to_owned(),
        ),
        (_, path) if path.starts_with("/socket/") => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; open a WebSocket with GET".to_owned(),
        ),
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not found; the gateway serves /websocket/token, /socket/<token>, /api/v1/messages, \
             /api/v1/sessions, /client/v1/wsgw.js, /metrics, /healthz and /readyz"
                .to_owned(),
        ),
    };
    Ok(response)
}

/// Serves a file of the browser client in clients/js, built into the binary. Browsers fetch module scripts with
/// CORS, so the response allows every origin: pages on other origins import it, and it contains no secrets.
fn client_library(source: &'static str, content_type: &'static str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(source.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

/// Reads the request's `Origin` header: None when absent, `Some(Err(()))` when it is not text.
fn request_origin(request: &Request<Incoming>) -> Option<Result<String, ()>> {
    request
        .headers()
        .get(header::ORIGIN)
        .map(|value| value.to_str().map(str::to_owned).map_err(|_| ()))
}

/// Returns the 403 response for a browser request from an origin outside `server.allowed_origins`, if it is one.
fn foreign_origin(gateway: &Gateway, origin: &Option<Result<String, ()>>) -> Option<HttpResponse> {
    let allowed = match origin {
        None => true,
        Some(Ok(origin)) => gateway.origins.allows(Some(origin)),
        Some(Err(())) => false,
    };
    if allowed {
        return None;
    }
    let shown = match origin {
        Some(Ok(origin)) => format!("{origin:?}"),
        _ => "(not text)".to_owned(),
    };
    Some(error_response(
        StatusCode::FORBIDDEN,
        format!("origin {shown} is not allowed; an operator can add it to server.allowed_origins"),
    ))
}

/// Lets a browser page from an allowed origin read the response (CORS).
fn with_cors(
    gateway: &Gateway,
    origin: &Option<Result<String, ()>>,
    mut response: HttpResponse,
) -> HttpResponse {
    if let Some(Ok(origin)) = origin {
        if gateway.origins.allows(Some(origin)) {
            if let Ok(value) = HeaderValue::from_str(origin) {
                let headers = response.headers_mut();
                headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
                headers.insert(header::VARY, HeaderValue::from_static("Origin"));
            }
        }
    }
    response
}

/// `OPTIONS /websocket/token`: the CORS preflight of a browser that sends the API key in `Authorization`.
fn preflight(gateway: &Gateway, request: &Request<Incoming>) -> HttpResponse {
    let origin = request_origin(request);
    if origin.is_none() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "a CORS preflight needs an Origin header".to_owned(),
        );
    }
    if let Some(rejection) = foreign_origin(gateway, &origin) {
        return rejection;
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    with_cors(gateway, &origin, response)
}

/// `GET /metrics`: OpenMetrics text, which Prometheus reads. It holds no secrets and needs no API key.
fn metrics(gateway: &Gateway) -> HttpResponse {
    gateway
        .metrics
        .rabbitmq_connected
        .set(i64::from(gateway.broker.is_ready()));
    gateway
        .metrics
        .rabbitmq_blocked
        .set(i64::from(gateway.broker.is_blocked()));
    let mut response = Response::new(Full::new(Bytes::from(gateway.metrics.encode())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

fn readiness(gateway: &Gateway) -> HttpResponse {
    if gateway.shutdown.is_cancelled() {
        error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_owned())
    } else if gateway.broker.is_ready() {
        json_response(StatusCode::OK, "ready", None)
    } else {
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the message broker is unreachable".to_owned(),
        )
    }
}

/// Checks the bearer API key; returns the error response when it is missing or wrong.
fn authorize(gateway: &Gateway, request: &Request<Incoming>) -> Option<HttpResponse> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let Some(key) = auth::bearer(authorization) else {
        return Some(error_response(
            StatusCode::UNAUTHORIZED,
            "missing API key; send it as `Authorization: Bearer <key>`".to_owned(),
        ));
    };
    if !auth::api_key_matches(&gateway.keys().api_keys, key) {
        return Some(error_response(
            StatusCode::UNAUTHORIZED,
            "invalid API key; use a key listed in auth.api_keys (for a local wsgw serve without one, the apiKey in its credentials.json)".to_owned(),
        ));
    }
    None
}

/// `GET /websocket/token?uniqueId=..&clientType=..[&tags=a,b][&businesses=x][&ttl=30s]` with an API key.
fn issue_token(gateway: &Gateway, request: &Request<Incoming>) -> HttpResponse {
    if let Some(rejection) = authorize(gateway, request) {
        return rejection;
    }

    let query = request.uri().query().unwrap_or("");
    let mut unique_id = None;
    let mut client_type = None;
    let mut tags = Vec::new();
    let mut businesses = Vec::new();
    let mut ttl = gateway.config.auth.token_ttl;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "uniqueId" => unique_id = Some(value.into_owned()),
            "clientType" => client_type = Some(value.into_owned()),
            "tags" => tags.extend(split_list(&value)),
            "businesses" => businesses.extend(split_list(&value)),
            "ttl" => match humantime::parse_duration(&value) {
                Ok(parsed)
                    if parsed > Duration::ZERO && parsed <= gateway.config.auth.max_token_ttl =>
                {
                    ttl = parsed
                }
                _ => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "invalid ttl {value:?}: give a duration such as 30s or 5m, at most {}",
                            humantime::format_duration(gateway.config.auth.max_token_ttl)
                        ),
                    );
                }
            },
            _ => {}
        }
    }
    let (Some(unique_id), Some(client_type)) = (unique_id, client_type) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "missing query parameter: give both uniqueId and clientType".to_owned(),
        );
    };
    let identity = match Identity::new(&unique_id, &client_type) {
        Ok(identity) => identity,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, error.to_string()),
    };
    // Token tags and businesses follow the envelope's rules, so broadcasts can match them.
    if let Err(error) = envelope::validate_tags("tags", &tags)
        .and_then(|()| envelope::validate_tags("businesses", &businesses))
    {
        return error_response(StatusCode::BAD_REQUEST, error.to_string());
    }
    let token = gateway
        .keys()
        .signer
        .mint(&identity, &tags, &businesses, ttl, SystemTime::now());
    let url = format!("{}/socket/{token}", gateway.public_url);
    debug!(%identity, "issued a connection token");
    json_response(StatusCode::OK, "ok", Some(url))
}

fn split_list(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
}

/// `GET /socket/<token>`: checks the handshake headers, then the token, then switches protocols.
async fn upgrade(
    gateway: Arc<Gateway>,
    remote: SocketAddr,
    permit: Arc<OwnedSemaphorePermit>,
    mut request: Request<Incoming>,
) -> HttpResponse {
    if let Some(rejection) = foreign_origin(&gateway, &request_origin(&request)) {
        info!(%remote, "rejected a WebSocket connection from a foreign origin");
        return rejection;
    }
    let client_ip = gateway.proxies.client_address(
        remote.ip(),
        request
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok()),
    );
    let client = SocketAddr::new(client_ip, remote.port());
    let headers = request.headers();
    let has_token = |name: header::HeaderName, expected: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .map(|text| {
                    text.split(',')
                        .any(|part| part.trim().eq_ignore_ascii_case(expected))
                })
                .unwrap_or(false)
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return error_response(
            StatusCode::BAD_REQUEST,
            "not a WebSocket upgrade request; connect with a WebSocket client".to_owned(),
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut response = error_response(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version; use version 13".to_owned(),
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "missing Sec-WebSocket-Key header".to_owned(),
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|protocol| protocol.trim().to_owned())
        .collect();
    if !offered.is_empty() && !offered.iter().any(|protocol| protocol == PROTOCOL_V1) {
        return error_response(
            StatusCode::BAD_REQUEST,
            format!("unsupported subprotocol {offered:?}; offer {PROTOCOL_V1}"),
        );
    }

    let token = request.uri().path().trim_start_matches("/socket/");
    let now = SystemTime::now();
    let claims = match gateway.keys().signer.verify(token, now) {
        Ok(claims) => claims,
        Err(error) => {
            info!(%client, reason = %error, "rejected a WebSocket connection");
            return error_response(StatusCode::UNAUTHORIZED, error.to_string());
        }
    };
    // Checked before the token is spent, so a client turned away here can retry with the same token.
    let admission = match gateway.session_limits.admit(client_ip) {
        Ok(admission) => admission,
        Err(error) => {
            info!(%client, identity = %claims.identity(), reason = %error, "rejected a WebSocket connection");
            let status = match error {
                AdmissionError::NodeFull(_) => StatusCode::SERVICE_UNAVAILABLE,
                AdmissionError::AddressFull(_) => StatusCode::TOO_MANY_REQUESTS,
            };
            return error_response(status, error.to_string());
        }
    };
    match gateway
        .used_tokens
        .claim(&claims.nonce, claims.expires_at_ms, unix_millis(now))
    {
        Ok(()) => {}
        Err(ClaimError::Reused) => {
            info!(%client, identity = %claims.identity(), "rejected a reused token");
            return error_response(StatusCode::UNAUTHORIZED, TokenError::Reused.to_string());
        }
        Err(ClaimError::Full) => {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections in the last token lifetime; retry shortly".to_owned(),
            );
        }
    }

    let on_upgrade = hyper::upgrade::on(&mut request);
    let session_config = gateway.config.session.clone();
    let tasks = gateway.tasks.clone();
    tasks.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                debug!(%client, %error, "WebSocket upgrade failed");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(session_config.read_buffer_size)
            .write_buffer_size(session_config.write_buffer_size)
            .max_write_buffer_size(session_config.max_write_buffer_size)
            .max_message_size(Some(session_config.max_message_size))
            .max_frame_size(Some(session_config.max_frame_size));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        session::run(gateway, socket, claims, client).await;
        drop(admission);
        drop(permit);
    });

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let response_headers = response.headers_mut();
    response_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    response_headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        response_headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if !offered.is_empty() {
        response_headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(PROTOCOL_V1),
        );
    }
    response
}

/// `GET /api/v1/sessions` with an API key: this node's live sessions, in the shape of a control reply.
fn list_sessions(gateway: &Gateway, request: &Request<Incoming>) -> HttpResponse {
    if let Some(rejection) = authorize(gateway, request) {
        return rejection;
    }
    let data = json!({
        "node": gateway.node,
        "sessions": gateway.registry.views(&gateway.node),
        "peers": gateway.peers(),
    });
    with_json(
        StatusCode::OK,
        json!({ "result": 0, "description": "ok", "data": data }),
    )
}

/// `DELETE /api/v1/sessions/<sessionId>` with an API key: closes that session with the kicked code.
fn kick_session(gateway: &Gateway, request: &Request<Incoming>) -> HttpResponse {
    if let Some(rejection) = authorize(gateway, request) {
        return rejection;
    }
    let session_id = request.uri().path().trim_start_matches("/api/v1/sessions/");
    if gateway.registry.kick(session_id) {
        info!(session_id = %session_id, "session kicked by an operator");
        json_response(StatusCode::OK, "kicked", Some(gateway.node.clone()))
    } else {
        error_response(
            StatusCode::NOT_FOUND,
            format!(
                "no session {session_id:?} on node {}; list them with `wsgw sessions`",
                gateway.node
            ),
        )
    }
}

/// Longest `wait` the publish API accepts.
const MAX_PUBLISH_WAIT: Duration = Duration::from_secs(300);

/// `POST /api/v1/messages[?wait=10s]` with an API key and an envelope as the body: publishes with a confirm.
/// 202 with the messageId once the broker confirmed; with `wait`, 200 and the receipt once a client acked.
async fn publish_message(gateway: &Gateway, request: Request<Incoming>) -> HttpResponse {
    if let Some(rejection) = authorize(gateway, &request) {
        return rejection;
    }
    let mut wait = None;
    for (name, value) in url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
    {
        if name == "wait" {
            match humantime::parse_duration(&value) {
                Ok(parsed) if parsed <= MAX_PUBLISH_WAIT => wait = Some(parsed),
                _ => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        format!("invalid wait {value:?}: give a duration such as 10s, at most 5m"),
                    );
                }
            }
        }
    }
    let limit = gateway.config.session.max_message_size;
    let body = match http_body_util::Limited::new(request.into_body(), limit)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {limit} bytes (session.max_message_size)"),
            );
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "the body is not UTF-8 JSON".to_owned(),
        );
    };
    let mut envelope = match Envelope::from_json(text) {
        Ok(envelope) => envelope,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, error.to_string()),
    };
    if envelope.send_type == SendType::ClientToServer {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid sendType \"CLIENT_TO_SERVER\": clients send those over their WebSocket; publish SERVER_TO_CLIENT \
             or CLIENT_TO_CLIENT here"
                .to_owned(),
        );
    }
    envelope.stamp_first_publish();
    let publication = match Publication::new(envelope) {
        Ok(publication) => publication,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let direct = publication.destination.is_direct();
    let business = gateway
        .metrics
        .business(&publication.envelope.business_type);
    let started = std::time::Instant::now();
    let outcome = match wait {
        Some(wait) if direct => gateway.broker.publish_and_wait(publication, wait).await,
        Some(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "wait needs a direct message (toUniqueId): broadcasts are at-most-once and have no receipts".to_owned(),
            );
        }
        None => gateway
            .broker
            .publish(publication)
            .await
            .map(|published| (published, None)),
    };
    match outcome {
        Ok((published, receipt)) => {
            // With `wait` the time includes waiting for the receipt, so it is not a confirm latency.
            if wait.is_none() {
                gateway.metrics.observe_confirm(started.elapsed());
            }
            gateway.metrics.published.get_or_create(&business).inc();
            let data = json!({
                "messageId": published.message_id,
                "timestamp": published.timestamp,
                "receipt": receipt,
            });
            let (status, description) = match (&receipt, wait) {
                (Some(_), _) => (StatusCode::OK, "delivered".to_owned()),
                (None, Some(wait)) => (
                    StatusCode::ACCEPTED,
                    format!(
                        "accepted; no client acked within {}, so the message is still queued",
                        humantime::format_duration(wait)
                    ),
                ),
                (None, None) => (StatusCode::ACCEPTED, "accepted".to_owned()),
            };
            with_json(
                status,
                json!({ "result": 0, "description": description, "data": data }),
            )
        }
        Err(error) => {
            info!(%error, "publish through the HTTP API failed");
            let status = match &error {
                BrokerError::Unroutable { .. } => StatusCode::NOT_FOUND,
                BrokerError::Refused { .. } | BrokerError::MemoryFull { .. } => {
                    StatusCode::TOO_MANY_REQUESTS
                }
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            error_response(status, error.to_string())
        }
    }
}

fn json_response(status: StatusCode, description: &str, data: Option<String>) -> HttpResponse {
    let body = json!({ "result": 0, "description": description, "data": data });
    with_json(status, body)
}

fn error_response(status: StatusCode, description: String) -> HttpResponse {
    let body = json!({ "result": status.as_u16(), "description": description, "data": null });
    with_json(status, body)
}

fn with_json(status: StatusCode, body: serde_json::Value) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
