//! Every refusal the API gives, mapped to an HTTP status in one place. Bodies are JSON
//! `{"error": CODE, "message": TEXT}` (plus `"verdict"` for admission refusals); an
//! internal fault answers 500 with no detail while the cause is logged.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tessera_enclave::EnclaveError;
use tessera_secagg::{Error as CoreError, ProtocolError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub verdict: Option<Box<serde_json::Value>>,
    /// Who was refused, when the caller authenticated (for the denial log).
    pub principal: Option<Box<str>>,
}

/// Attached to every error response, so the denial log can name what was refused.
#[derive(Clone, Debug)]
pub struct ErrorNote {
    pub code: &'static str,
    pub message: String,
    pub principal: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    verdict: Option<&'a serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), verdict: None, principal: None }
    }

    /// Names the authenticated caller this refusal is for.
    pub fn by(mut self, p: &crate::auth::Principal) -> Self {
        self.principal = Some(format!("{} ({})", p.name, p.role).into_boxed_str());
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_yet(what: &str) -> Self {
        Self::new(StatusCode::TOO_EARLY, "not_ready", format!("{what} is not available yet; retry shortly"))
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body { error: self.code, message: &self.message, verdict: self.verdict.as_deref() };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 9110 §11.6.1: a 401 names the scheme it wants.
            let challenge = match self.code {
                "invalid_token" => "Bearer realm=\"tessera\", error=\"invalid_token\"",
                _ => "Bearer realm=\"tessera\"",
            };
            resp.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static(challenge));
        }
        resp.extensions_mut().insert(ErrorNote { code: self.code, message: self.message, principal: self.principal.map(String::from) });
        resp
    }
}

impl From<EnclaveError> for ApiError {
    fn from(e: EnclaveError) -> Self {
        let msg = e.to_string();
        match e {
            EnclaveError::Protocol(core) => core_error(core, msg),
            EnclaveError::NotAdmitted { verdict, .. } => ApiError {
                status: StatusCode::FORBIDDEN,
                code: "not_admitted",
                message: msg,
                verdict: serde_json::to_value(&*verdict).ok().map(Box::new),
                principal: None,
            },
            EnclaveError::NoRound => ApiError::new(StatusCode::NOT_FOUND, "no_round", msg),
            EnclaveError::RoundOpen(_) => ApiError::new(StatusCode::CONFLICT, "round_open", msg),
            EnclaveError::Budget(_) => ApiError::new(StatusCode::CONFLICT, "privacy_budget", msg),
            EnclaveError::BudgetExhausted(_) => ApiError::new(StatusCode::CONFLICT, "privacy_budget_exhausted", msg),
            EnclaveError::FederationMissing { .. } => ApiError::internal(msg),
            EnclaveError::Unseal(_) | EnclaveError::ReplayMismatch { .. } | EnclaveError::Attestation(_) | EnclaveError::Log(_) | EnclaveError::Internal(_) => {
                ApiError::internal(msg)
            }
        }
    }
}

fn core_error(e: CoreError, msg: String) -> ApiError {
    use StatusCode as S;
    let (status, code) = match &e {
        CoreError::Config(_) => (S::BAD_REQUEST, "invalid_config"),
        CoreError::Malformed(_) => (S::BAD_REQUEST, "malformed"),
        CoreError::Crypto(_) => (S::BAD_REQUEST, "crypto"),
        // The server's own spool file failed it: not the sender's fault, worth a retry.
        CoreError::Io(_) => (S::SERVICE_UNAVAILABLE, "spool"),
        // Client-side refusals; the server never produces them.
        CoreError::BelowFloor(_) => (S::BAD_REQUEST, "below_floor"),
        CoreError::Protocol(p) => match p {
            ProtocolError::WrongRound { .. } => (S::CONFLICT, "wrong_round"),
            ProtocolError::WrongPhase { .. } => (S::CONFLICT, "wrong_phase"),
            ProtocolError::UnknownClient(_) => (S::FORBIDDEN, "unknown_client"),
            ProtocolError::Duplicate(_) => (S::CONFLICT, "duplicate"),
            ProtocolError::NotInSurvivorSet(_) => (S::FORBIDDEN, "not_in_survivor_set"),
            ProtocolError::BadSignature(_) => (S::UNAUTHORIZED, "bad_signature"),
            ProtocolError::WrongLength { .. } => (S::BAD_REQUEST, "wrong_length"),
            ProtocolError::BadShares { .. } => (S::BAD_REQUEST, "bad_shares"),
            ProtocolError::Aborted(_) => (S::GONE, "round_aborted"),
            ProtocolError::TooStale { .. } => (S::CONFLICT, "too_stale"),
            ProtocolError::FutureVersion { .. } | ProtocolError::BaseVersion(_) => (S::BAD_REQUEST, "base_version"),
            _ => (S::BAD_REQUEST, "protocol"),
        },
    };
    ApiError::new(status, code, msg)
}
