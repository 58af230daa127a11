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
use tessera_enclave::MessageKind;
use tessera_secagg::ClientId;

use crate::auth::{require, require_participant, PeerCertificate, Principal, Role, SESSION_COOKIE};
use crate::compliance::RoundFilter;
use crate::config::RoundParams;
use crate::error::{ApiError, ErrorNote};
use crate::service::Service;
use crate::store::Denial;

/// Limit for JSON control messages.
pub const JSON_LIMIT: usize = 4 << 20;

/// The OpenAPI document of this API (also in the repository as `server/openapi.json`).
pub const OPENAPI: &str = include_str!("../openapi.json");

pub fn app(service: Arc<Service>) -> Router {
    let metrics = service.metrics.clone();
    Router::new()
        .route("/v1/health", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .route("/v1/attestation", get(attestation))
        .route("/v1/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/v1/rounds", get(list_rounds).post(open_round))
        .route("/v1/privacy", get(privacy))
        .route("/v1/rounds/{round}/report", get(report))
        .route("/v1/log/head", get(log_head))
        .route("/v1/log/entries", get(log_entries))
        .route("/v1/log/proof/inclusion", get(inclusion_proof))
        .route("/v1/log/proof/consistency", get(consistency_proof))
        .route("/v1/denials", get(denials))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/reports", get(reports_page))
        .route("/reports/{round}", get(report_page))
        .route("/v1/rounds/current", get(current))
        .route("/v1/rounds/{round}", get(status))
        .route("/v1/rounds/{round}/advertise", post(advertise))
        .route("/v1/rounds/{round}/key-directory/{client}", get(key_directory))
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
        .layer(axum::middleware::from_fn_with_state(service.clone(), record_denials))
        .layer(axum::middleware::from_fn_with_state(metrics, crate::metrics::track))
        .with_state(service)
}

/// Every 401/403 goes to the denial log (auditors read it at `/v1/denials`) and to the
/// server's log; other refusals go to the log at debug level.
async fn record_denials(State(s): State<Arc<Service>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        let note = resp.extensions().get::<ErrorNote>().cloned();
        let reason = note.as_ref().map(|n| format!("{}: {}", n.code, n.message)).unwrap_or_else(|| status.to_string());
        let principal = note.and_then(|n| n.principal);
        tracing::warn!(%method, %path, status = status.as_u16(), principal = principal.as_deref().unwrap_or("-"), %reason, "request denied");
        s.record_denial(Denial { at_ms: crate::service::now().0, method, path, status: status.as_u16(), principal, reason });
    } else if status.is_client_error() || status.is_server_error() {
        let note = resp.extensions().get::<ErrorNote>();
        tracing::debug!(%method, %path, status = status.as_u16(), code = note.map_or("-", |n| n.code), message = note.map_or("", |n| n.message.as_str()), "request refused");
    }
    resp
}

/// The authenticated caller, if any: a bearer token, the session cookie, or a pinned
/// client certificate. A credential that matches nothing is refused here (401).
struct Caller(Option<Principal>);

impl FromRequestParts<Arc<Service>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<Service>) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<PeerCertificate>().copied();
        Ok(Caller(state.authenticator().authenticate(&parts.headers, peer)?))
    }
}

/// Query parameters; a malformed query is a typed 400.
struct Query<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| ApiError::bad_request("bad_query", e.body_text()))
    }
}

const READERS: &[Role] = &[Role::Auditor, Role::Admin];
const ANY_ROLE: &[Role] = &[Role::Institution, Role::Auditor, Role::Admin];

async fn list_rounds(State(s): State<Arc<Service>>, Caller(who): Caller, Query(filter): Query<RoundFilter>) -> Result<Response, ApiError> {
    let who = require(who, ANY_ROLE, "the round list")?;
    Ok(json(&s.list_rounds(&filter, &who).await?))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    since_size: Option<u64>,
}

async fn report(State(s): State<Arc<Service>>, Caller(who): Caller, Path(round): Path<u64>, Query(q): Query<ReportQuery>) -> Result<Response, ApiError> {
    let who = require(who, ANY_ROLE, "a round report")?;
    require_participant(&who, &s.roster(round).await?, round)?;
    Ok(json(&s.bundle(round, q.since_size).await?))
}

async fn log_head(State(s): State<Arc<Service>>, Caller(who): Caller) -> Result<Response, ApiError> {
    require(who, ANY_ROLE, "the log's tree head")?;
    Ok(json(&s.log_head().await))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeQuery {
    #[serde(default)]
    start: u64,
    end: Option<u64>,
}

async fn log_entries(State(s): State<Arc<Service>>, Caller(who): Caller, Query(q): Query<RangeQuery>) -> Result<Response, ApiError> {
    require(who, READERS, "log entries")?;
    Ok(json(&s.log_entries(q.start, q.end).await?))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InclusionQuery {
    index: u64,
    tree_size: Option<u64>,
}

async fn inclusion_proof(State(s): State<Arc<Service>>, Caller(who): Caller, Query(q): Query<InclusionQuery>) -> Result<Response, ApiError> {
    require(who, READERS, "inclusion proofs")?;
    Ok(json(&s.inclusion_proof(q.index, q.tree_size).await?))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyQuery {
    first: u64,
    second: Option<u64>,
}

async fn consistency_proof(State(s): State<Arc<Service>>, Caller(who): Caller, Query(q): Query<ConsistencyQuery>) -> Result<Response, ApiError> {
    require(who, READERS, "consistency proofs")?;
    Ok(json(&s.consistency_proof(q.first, q.second).await?))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<u32>,
}

async fn denials(State(s): State<Arc<Service>>, Caller(who): Caller, Query(q): Query<LimitQuery>) -> Result<Response, ApiError> {
    require(who, READERS, "the denial log")?;
    Ok(json(&s.store().denials(q.limit.unwrap_or(100).min(1000)).await?))
}

fn html(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

/// Pages send a browser without a session to the sign-in form.
fn page_error(e: ApiError) -> Response {
    if e.status == StatusCode::UNAUTHORIZED {
        let mut resp = html(StatusCode::UNAUTHORIZED, crate::pages::login(Some(&e.message)));
        resp.extensions_mut().insert(ErrorNote { code: e.code, message: e.message, principal: e.principal.map(String::from) });
        return resp;
    }
    let status = e.status;
    let body = crate::pages::error_page(status, e.code, &e.message);
    let mut resp = html(status, body);
    resp.extensions_mut().insert(ErrorNote { code: e.code, message: e.message, principal: e.principal.map(String::from) });
    resp
}

async fn login_page() -> Response {
    html(StatusCode::OK, crate::pages::login(None))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(s): State<Arc<Service>>, headers: HeaderMap, body: Body) -> Response {
    let result: Result<Response, ApiError> = async {
        let bytes = read_body(&s, &headers, body, 4096).await?;
        let form: LoginForm = serde_urlencoded_form(&bytes)?;
        if form.token.is_empty() {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "no token given"));
        }
        // The token goes back as a cookie value: visible ASCII without `;` or `,`.
        if !form.token.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b',') {
            return Err(ApiError::bad_request("malformed", "the token has characters a cookie cannot carry"));
        }
        let who = s.authenticator().authenticate_token(&form.token)?;
        tracing::info!(principal = %who.name, role = %who.role, "signed in to the report pages");
        let cookie = format!("{SESSION_COOKIE}={}; HttpOnly; Secure; SameSite=Strict; Path=/", form.token);
        Ok((StatusCode::SEE_OTHER, [(header::LOCATION, "/reports".to_string()), (header::SET_COOKIE, cookie)]).into_response())
    }
    .await;
    result.unwrap_or_else(page_error)
}

fn serde_urlencoded_form<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_urlencoded::from_bytes(bytes).map_err(|e| ApiError::bad_request("malformed", format!("the form does not parse: {e}")))
}

async fn logout() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0");
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/login".to_string()), (header::SET_COOKIE, cookie)]).into_response()
}

async fn reports_page(State(s): State<Arc<Service>>, caller: Result<Caller, ApiError>, query: Result<Query<RoundFilter>, ApiError>) -> Response {
    let result: Result<Response, ApiError> = async {
        let who = require(caller?.0, ANY_ROLE, "the round list")?;
        let Query(filter) = query?;
        let rounds = s.list_rounds(&filter, &who).await?;
        Ok(html(StatusCode::OK, crate::pages::round_list(&rounds, &format!("{} ({})", who.name, who.role))))
    }
    .await;
    result.unwrap_or_else(page_error)
}

async fn report_page(State(s): State<Arc<Service>>, caller: Result<Caller, ApiError>, path: Result<Path<u64>, ApiError>) -> Response {
    let result: Result<Response, ApiError> = async {
        let who = require(caller?.0, ANY_ROLE, "a round report")?;
        let Path(round) = path?;
        require_participant(&who, &s.roster(round).await?, round)?;
        Ok(html(StatusCode::OK, crate::pages::report(&s.bundle(round, None).await?)))
    }
    .await;
    result.unwrap_or_else(page_error)
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

/// Reads a body up to `limit` bytes within the configured time; larger bodies get 413
/// before they are buffered, slower ones 408.
async fn read_body(s: &Service, headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    within_body_deadline(s, headers, limit, async move {
        match Limited::new(body, limit).collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large(limit)),
            Err(e) => Err(ApiError::bad_request("body", format!("could not read the request body: {e}"))),
        }
    })
    .await
}

/// Receives a request body with `receive`, under the limits every body gets: one that
/// declares more than `limit` bytes is refused before it is read, and one that takes
/// longer than its deadline (by its declared size) is answered 408.
async fn within_body_deadline<T>(
    s: &Service,
    headers: &HeaderMap,
    limit: usize,
    receive: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    let timeout = s.config().limits.body_timeout(declared.unwrap_or(limit).min(limit));
    match tokio::time::timeout(timeout, receive).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", format!("the request body did not arrive within {timeout:?}"))),
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("request body exceeds {limit} bytes"))
}

/// Writes a request body of at most `limit` bytes to an unnamed file in the spool
/// directory as it arrives, under [`read_body`]'s deadline and limit: the server holds a
/// buffer of it, never the whole body (a masked input is up to 4 bytes per parameter).
/// The file is gone when it is dropped, whatever happens to the request.
async fn spool_body(s: &Service, headers: &HeaderMap, body: Body, limit: usize) -> Result<std::fs::File, ApiError> {
    within_body_deadline(s, headers, limit, spool_body_untimed(&s.spool_dir(), body, limit)).await
}

async fn spool_body_untimed(spool: &std::path::Path, mut body: Body, limit: usize) -> Result<std::fs::File, ApiError> {
    use tokio::io::AsyncWriteExt;
    let disk = |e: std::io::Error| spool_failed(spool, e);
    let file = tempfile::tempfile_in(spool).map_err(disk)?;
    // 64 KiB, as hyper's read buffer: per upload in flight, not per byte.
    let mut out = tokio::io::BufWriter::with_capacity(64 << 10, tokio::fs::File::from_std(file));
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request("body", format!("could not read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            received += data.len();
            if received > limit {
                return Err(too_large(limit));
            }
            out.write_all(&data).await.map_err(disk)?;
        }
    }
    out.flush().await.map_err(disk)?;
    Ok(out.into_inner().into_std().await)
}

fn spool_failed(spool: &std::path::Path, e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, spool = %spool.display(), "cannot spool a masked input");
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "spool", "the aggregator cannot take the upload now (its spool directory failed); retry")
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    Json(v).into_response()
}

async fn metrics_text(State(s): State<Arc<Service>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NonceQuery {
    nonce: Option<String>,
}

/// The aggregator's evidence; with `?nonce=HEX` (16 to 64 bytes) also evidence made now
/// and bound to that nonce, for per-connection freshness.
async fn attestation(State(s): State<Arc<Service>>, Query(q): Query<NonceQuery>) -> Result<Response, ApiError> {
    let mut info = s.attestation();
    if let Some(n) = q.nonce {
        let nonce = hex::decode(&n)
            .ok()
            .filter(|b| (16..=64).contains(&b.len()))
            .ok_or_else(|| ApiError::bad_request("bad_query", "nonce must be 16 to 64 bytes of hex"))?;
        info.fresh_evidence = Some(hex::encode(s.fresh_evidence(&nonce).await?));
        info.nonce = Some(n.to_ascii_lowercase());
    }
    Ok(json(&info))
}

async fn open_round(State(s): State<Arc<Service>>, Caller(who): Caller, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    require(who, &[Role::Admin], "opening a round")?;
    let bytes = read_body(&s, &headers, body, JSON_LIMIT).await?;
    let params: RoundParams = serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request("malformed", e.to_string()))?;
    let cfg = s.open_round(&params).await?;
    Ok((StatusCode::CREATED, Json(cfg)).into_response())
}

async fn current(State(s): State<Arc<Service>>) -> Result<Response, ApiError> {
    let cfg = s.current_config().await.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no_round", "no round has been opened"))?;
    Ok(json(&s.status(cfg.round).await?))
}

async fn privacy(State(s): State<Arc<Service>>, Caller(who): Caller) -> Result<Response, ApiError> {
    require(who, ANY_ROLE, "the privacy report")?;
    Ok(json(&s.privacy().await?))
}

async fn status(State(s): State<Arc<Service>>, Path(round): Path<u64>) -> Result<Response, ApiError> {
    Ok(json(&s.status(round).await?))
}

/// Runs a submission to its end even if the client goes away meanwhile. A request whose
/// connection closes is dropped where it stands; dropped between the enclave's acceptance
/// and the store's commit, it would leave the enclave counting a message the store never
/// got (and the client's retry answered "already accepted"). Spawned, it completes.
async fn detached<T: Send + 'static>(submission: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static) -> Result<T, ApiError> {
    tokio::spawn(submission).await.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the submission did not complete: {e}")))?
}

async fn submit_json(s: &Arc<Service>, round: u64, kind: MessageKind, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(s, headers, body, JSON_LIMIT).await?;
    let service = s.clone();
    let verdict = detached(async move { service.submit(round, kind, &bytes).await }).await?;
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
    let permit = s.upload_permit().await?;
    let file = spool_body(&s, &headers, body, Service::masked_input_limit(&cfg)).await?;
    let input = tessera_enclave::spool::SpooledInput::whole(file).map_err(|e| spool_failed(&s.spool_dir(), e))?;
    // Checked here, where a client that goes away cancels the check; only the fold and
    // the commit run to their end regardless.
    s.preverify_masked_input(round, &input).await?;
    detached(async move {
        let _permit = permit;
        s.accept_masked_input(round, input).await
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({"accepted": true}))).into_response())
}

/// `?wait=SECONDS` (0 to 30, default 0): how long a read of a phase's data may park
/// until the phase is ready, instead of answering `not_ready` at once.
struct Wait(std::time::Duration);

impl<S: Send + Sync> FromRequestParts<S> for Wait {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(query) = parts.uri.query() else { return Ok(Wait(std::time::Duration::ZERO)) };
        let mut wait = std::time::Duration::ZERO;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("wait", v)) => {
                    let secs: u64 = v.parse().map_err(|_| ApiError::bad_request("bad_query", format!("wait must be a whole number of seconds, got {v:?}")))?;
                    if std::time::Duration::from_secs(secs) > crate::service::MAX_WAIT {
                        return Err(ApiError::bad_request("bad_query", format!("wait may be at most {} s, got {secs}", crate::service::MAX_WAIT.as_secs())));
                    }
                    wait = std::time::Duration::from_secs(secs);
                }
                _ => return Err(ApiError::bad_request("bad_query", format!("unknown query parameter {pair:?}; only wait=SECONDS is accepted"))),
            }
        }
        Ok(Wait(wait))
    }
}

async fn key_directory(State(s): State<Arc<Service>>, Path((round, client)): Path<(u64, u32)>, Wait(wait): Wait) -> Result<Response, ApiError> {
    let to = ClientId(client);
    let dir = s
        .long_poll(wait, || {
            s.read(round, "the key directory", |e| {
                let agg = e.aggregator().ok()?;
                match agg.key_directory(to) {
                    Some(dir) => Some(Ok(dir)),
                    // Phase 0 closed without this client: it will never be in U1, so it
                    // hears so now rather than waiting out the round.
                    None if agg.phase() > tessera_secagg::aggregator::Phase::AdvertiseKeys && agg.phase() != tessera_secagg::aggregator::Phase::Aborted => {
                        Some(Err(ApiError::from(tessera_enclave::EnclaveError::Protocol(tessera_secagg::ProtocolError::NotInSurvivorSet(to).into()))))
                    }
                    None => None,
                }
            })
        })
        .await??;
    Ok(json(&dir))
}

async fn share_bundle(State(s): State<Arc<Service>>, Path((round, client)): Path<(u64, u32)>, Wait(wait): Wait) -> Result<Response, ApiError> {
    let b = s.long_poll(wait, || s.read(round, "the share bundle", |e| e.aggregator().ok()?.share_bundle(ClientId(client)))).await?;
    Ok(json(&b))
}

async fn survivors(State(s): State<Arc<Service>>, Path(round): Path<u64>, Wait(wait): Wait) -> Result<Response, ApiError> {
    Ok(json(&s.long_poll(wait, || s.read(round, "the survivor set", |e| e.aggregator().ok()?.survivor_set())).await?))
}

async fn unmask_request(State(s): State<Arc<Service>>, Path(round): Path<u64>, Wait(wait): Wait) -> Result<Response, ApiError> {
    Ok(json(&s.long_poll(wait, || s.read(round, "the unmask request", |e| e.aggregator().ok()?.unmask_request())).await?))
}

async fn result(State(s): State<Arc<Service>>, Path(round): Path<u64>, Wait(wait): Wait) -> Result<Response, ApiError> {
    let (release, _) = s.long_poll(wait, || s.result(round)).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], release).into_response())
}

async fn result_mean(State(s): State<Arc<Service>>, Path(round): Path<u64>, Wait(wait): Wait) -> Result<Response, ApiError> {
    let (_, mean) = s.long_poll(wait, || s.result(round)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], mean).into_response())
}

#[cfg(test)]
mod tests {
    /// A body that states no length, in frames of `frame` bytes.
    struct Chunked {
        left: usize,
        frame: usize,
    }

    impl axum::body::HttpBody for Chunked {
        type Data = axum::body::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
            let n = self.left.min(self.frame);
            self.left -= n;
            std::task::Poll::Ready((n > 0).then(|| Ok(hyper::body::Frame::data(axum::body::Bytes::from(vec![7u8; n])))))
        }
    }

    /// An upload without a Content-Length is refused (413) as soon as more than the limit
    /// has arrived, and one within it is spooled whole, byte for byte.
    #[tokio::test]
    async fn uploads_are_spooled_and_cut_at_the_limit() {
        use std::io::{Read, Seek};
        let spool = tempfile::tempdir().unwrap();
        let body = |left| axum::body::Body::new(Chunked { left, frame: 1000 });
        let err = super::spool_body_untimed(spool.path(), body(10_001), 10_000).await.unwrap_err();
        assert_eq!((err.status.as_u16(), err.code), (413, "body_too_large"));
        let mut file = super::spool_body_untimed(spool.path(), body(10_000), 10_000).await.unwrap();
        let mut back = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut back).unwrap();
        assert_eq!(back, vec![7u8; 10_000]);
        // The spool holds no named file either way.
        assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0);
    }

    /// Every route this router serves is described in the OpenAPI document, with its method.
    #[test]
    fn openapi_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("openapi.json parses");
        assert_eq!(doc["openapi"], "3.1.0");
        let source = include_str!("api.rs");
        let mut seen = 0;
        for line in source.lines().map(str::trim).filter(|l| l.starts_with(".route(\"")) {
            let path = line.trim_start_matches(".route(\"").split('"').next().unwrap_or_default();
            let entry = &doc["paths"][path];
            assert!(entry.is_object(), "{path} is not in server/openapi.json");
            for method in ["get", "post"] {
                if line.contains(&format!("{method}(")) {
                    assert!(entry[method].is_object(), "{method} {path} is not in server/openapi.json");
                    seen += 1;
                }
            }
        }
        assert!(seen >= 29, "only {seen} routes found");
        // And nothing is documented that is not served.
        let documented: usize = doc["paths"].as_object().map(|p| p.values().map(|m| m.as_object().map_or(0, |m| m.len())).sum()).unwrap_or(0);
        assert_eq!(documented, seen, "the document lists routes the server does not serve");
    }
}
