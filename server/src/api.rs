//! The REST API. `app(service)` is separate from `main` so tests can drive it in
//! process; every handler returns `Result<_, ApiError>`, and every refusal is a 4xx with
//! a typed JSON body.
//!
//! Client protocol endpoints, in round order (GETs answer 425 until ready):
//! `POST advertise` → `GET key-directory` → `POST share-keys` → `GET share-bundle/{client}`
//! → `POST masked-input` (binary) → `GET survivors` → `POST consistency`
//! → `GET unmask-request` → `POST unmask` → `GET result`, `GET result/mean`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Limited};
use subtle_eq::constant_time_eq;
use tessera_enclave::MessageKind;
use tessera_secagg::ClientId;

use crate::config::RoundParams;
use crate::error::ApiError;
use crate::service::Service;

/// Limit for JSON control messages.
pub const JSON_LIMIT: usize = 4 << 20;

mod subtle_eq {
    /// Constant-time comparison of secrets (bearer tokens).
    pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        a.len() == b.len() && bool::from(a.ct_eq(b))
    }
}

pub fn app(service: Arc<Service>) -> Router {
    let metrics = service.metrics.clone();
    Router::new()
        .route("/v1/health", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .route("/v1/attestation", get(attestation))
        .route("/v1/rounds", post(open_round))
        .route("/v1/privacy", get(privacy))
        .route("/v1/rounds/current", get(current))
        .route("/v1/rounds/{round}", get(status))
        .route("/v1/rounds/{round}/advertise", post(advertise))
        .route("/v1/rounds/{round}/key-directory", get(key_directory))
        .route("/v1/rounds/{round}/share-keys", post(share_keys))
        .route("/v1/rounds/{round}/share-bundle/{client}", get(share_bundle))
        .route("/v1/rounds/{round}/masked-input", post(masked_input))
        .route("/v1/rounds/{round}/survivors", get(survivors))
        .route("/v1/rounds/{round}/consistency", post(consistency))
        .route("/v1/rounds/{round}/unmask-request", get(unmask_request))
        .route("/v1/rounds/{round}/unmask", post(unmask))
        .route("/v1/rounds/{round}/result", get(result))
        .route("/v1/rounds/{round}/result/mean", get(result_mean))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(metrics, crate::metrics::track))
        .with_state(service)
}

/// Path parameters; a malformed one is a typed 400 rather than axum's plain-text reply.
struct Path<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| ApiError::bad_request("bad_path", e.body_text()))
    }
}

/// Reads a body up to `limit` bytes; larger bodies get 413 before they are buffered.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("request body exceeds {limit} bytes"));
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok()) {
        if len > limit {
            return Err(too_large());
        }
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request("body", format!("could not read the request body: {e}"))),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    Json(v).into_response()
}

async fn metrics_text(State(s): State<Arc<Service>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

async fn attestation(State(s): State<Arc<Service>>) -> Response {
    json(&s.attestation())
}

async fn open_round(State(s): State<Arc<Service>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if !constant_time_eq(token.as_bytes(), s.config().admin_token.as_bytes()) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "opening a round needs the admin bearer token"));
    }
    let bytes = read_body(&headers, body, JSON_LIMIT).await?;
    let params: RoundParams = serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request("malformed", e.to_string()))?;
    let cfg = s.open_round(&params).await?;
    Ok((StatusCode::CREATED, Json(cfg)).into_response())
}

async fn current(State(s): State<Arc<Service>>) -> Result<Response, ApiError> {
    let cfg = s.current_config().await.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no_round", "no round has been opened"))?;
    Ok(json(&s.status(cfg.round).await?))
}

async fn privacy(State(s): State<Arc<Service>>) -> Result<Response, ApiError> {
    Ok(json(&s.privacy().await?))
}

async fn status(State(s): State<Arc<Service>>, Path(round): Path<u64>) -> Result<Response, ApiError> {
    Ok(json(&s.status(round).await?))
}

async fn submit_json(s: &Service, round: u64, kind: MessageKind, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(headers, body, JSON_LIMIT).await?;
    let verdict = s.submit(round, kind, &bytes).await?;
    Ok(match verdict {
        Some(v) => (StatusCode::ACCEPTED, Json(serde_json::json!({"accepted": true, "verdict": v}))).into_response(),
        None => (StatusCode::ACCEPTED, Json(serde_json::json!({"accepted": true}))).into_response(),
    })
}

async fn advertise(State(s): State<Arc<Service>>, Path(round): Path<u64>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    submit_json(&s, round, MessageKind::Advertise, &headers, body).await
}

async fn share_keys(State(s): State<Arc<Service>>, Path(round): Path<u64>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    submit_json(&s, round, MessageKind::ShareKeys, &headers, body).await
}

async fn consistency(State(s): State<Arc<Service>>, Path(round): Path<u64>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    submit_json(&s, round, MessageKind::Consistency, &headers, body).await
}

async fn unmask(State(s): State<Arc<Service>>, Path(round): Path<u64>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    submit_json(&s, round, MessageKind::Unmask, &headers, body).await
}

async fn masked_input(State(s): State<Arc<Service>>, Path(round): Path<u64>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let cfg = s.current_config().await.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no_round", "no round has been opened"))?;
    let bytes = read_body(&headers, body, Service::masked_input_limit(&cfg)).await?;
    s.submit(round, MessageKind::MaskedInput, &bytes).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({"accepted": true}))).into_response())
}

async fn key_directory(State(s): State<Arc<Service>>, Path(round): Path<u64>) -> Result<Response, ApiError> {
    let dir = s.read(round, "the key directory", |e| e.aggregator().ok()?.key_directory()).await?;
    Ok(json(&dir))
}

async fn share_bundle(State(s): State<Arc<Service>>, Path((round, client)): Path<(u64, u32)>) -> Result<Response, ApiError> {
    let b = s.read(round, "the share bundle", |e| e.aggregator().ok()?.share_bundle(ClientId(client))).await?;
    Ok(json(&b))
}

async fn survivors(State(s): State<Arc<Service>>, Path(round): Path<u64>) -> Result<Response, ApiError> {
    Ok(json(&s.read(round, "the survivor set", |e| e.aggregator().ok()?.survivor_set()).await?))
}

async fn unmask_request(State(s): State<Arc<Service>>, Path(round): Path<u64>) -> Result<Response, ApiError> {
    Ok(json(&s.read(round, "the unmask request", |e| e.aggregator().ok()?.unmask_request()).await?))
}

async fn result(State(s): State<Arc<Service>>, Path(round): Path<u64>) -> Result<Response, ApiError> {
    let (release, _) = s.result(round).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], release).into_response())
}

async fn result_mean(State(s): State<Arc<Service>>, Path(round): Path<u64>) -> Result<Response, ApiError> {
    let (_, mean) = s.result(round).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], mean).into_response())
}
