//! Who is asking: bearer tokens and mTLS client certificates, both configured in the
//! server configuration, mapped to a [`Principal`] with a [`Role`].
//!
//! - `admin`: opens rounds, reads everything.
//! - `auditor`: reads everything in the log and every report; changes nothing.
//! - `institution`: reads the reports of rounds it was on the roster of, and the
//!   federation's privacy figures.
//!
//! Tokens are stored as SHA-256 digests and compared in constant time; client
//! certificates are pinned by the SHA-256 of their public key (SPKI). The client
//! protocol endpoints need neither: every protocol message is signed by the sender's
//! roster key. Every refusal is a typed 401/403, recorded by [`crate::api`]'s denial log.

use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ServerConfig;
use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Institution,
    Auditor,
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Institution => "institution",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        })
    }
}

/// One configured credential (`[[access]]` in the server configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessGrant {
    /// Who this is, as it appears in the denial log.
    pub name: String,
    pub role: Role,
    /// For `role = "institution"`: the institution's name in `[[institutions]]`.
    #[serde(default)]
    pub institution: Option<String>,
    /// SHA-256 of the bearer token, hex (`tessera-server token` prints a new pair).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// SHA-256 of the client certificate's SubjectPublicKeyInfo, hex (mTLS).
    #[serde(default)]
    pub client_cert_spki_sha256: Option<String>,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// The roster key of the institution, for `Role::Institution`.
    pub institution_key: Option<String>,
    pub institution: Option<String>,
}

/// The SHA-256 of the SPKI of the client certificate presented in this TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCertificate(pub [u8; 32]);

fn hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

pub fn validate(cfg: &ServerConfig) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    // One credential, one principal: a digest listed twice (or equal to the admin
    // token's) would make the role depend on the order of the grants.
    let mut digests = std::collections::BTreeSet::from([hex::encode(token_sha256(&cfg.admin_token))]);
    for g in &cfg.access {
        for d in [&g.token_sha256, &g.client_cert_spki_sha256].into_iter().flatten() {
            if !digests.insert(d.to_ascii_lowercase()) {
                return Err(format!("access grant {}: credential {d} is already given to another grant (or is the admin token)", g.name));
            }
        }
        if !names.insert(&g.name) {
            return Err(format!("access grant {} is listed twice", g.name));
        }
        if g.token_sha256.is_none() && g.client_cert_spki_sha256.is_none() {
            return Err(format!("access grant {}: give token_sha256 or client_cert_spki_sha256", g.name));
        }
        for v in [&g.token_sha256, &g.client_cert_spki_sha256].into_iter().flatten() {
            if hex32(v).is_none() {
                return Err(format!("access grant {}: {v:?} is not a SHA-256 in hex", g.name));
            }
        }
        match (g.role, &g.institution) {
            (Role::Institution, None) => return Err(format!("access grant {}: role institution needs institution = \"NAME\"", g.name)),
            (Role::Institution, Some(n)) if !cfg.institutions.iter().any(|i| &i.name == n) => {
                return Err(format!("access grant {}: institution {n} is not in [[institutions]]", g.name))
            }
            (Role::Auditor | Role::Admin, Some(_)) => return Err(format!("access grant {}: only role institution names an institution", g.name)),
            _ => {}
        }
    }
    Ok(())
}

/// The credentials, ready to match.
#[derive(Debug)]
pub struct Authenticator {
    admin_token_sha256: [u8; 32],
    grants: Vec<Grant>,
}

#[derive(Debug)]
struct Grant {
    grant: AccessGrant,
    token_sha256: Option<[u8; 32]>,
    cert_spki_sha256: Option<[u8; 32]>,
    institution_key: Option<String>,
}

pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Authenticator {
    pub fn new(cfg: &ServerConfig) -> Arc<Authenticator> {
        let grants = cfg
            .access
            .iter()
            .map(|g| {
                let key = g.institution.as_ref().and_then(|n| cfg.institutions.iter().find(|i| &i.name == n)).map(|i| i.public_key.to_ascii_lowercase());
                Grant {
                    grant: g.clone(),
                    token_sha256: g.token_sha256.as_deref().and_then(hex32),
                    cert_spki_sha256: g.client_cert_spki_sha256.as_deref().and_then(hex32),
                    institution_key: key,
                }
            })
            .collect();
        Arc::new(Authenticator { admin_token_sha256: token_sha256(&cfg.admin_token), grants })
    }

    fn principal(g: &Grant) -> Principal {
        Principal { name: g.grant.name.clone(), role: g.grant.role, institution_key: g.institution_key.clone(), institution: g.grant.institution.clone() }
    }

    /// The holder of a bearer token (also what the sign-in form checks).
    pub fn authenticate_token(&self, token: &str) -> Result<Principal, ApiError> {
        let digest = token_sha256(token);
        if bool::from(digest.ct_eq(&self.admin_token_sha256)) {
            return Ok(Principal { name: "admin".into(), role: Role::Admin, institution_key: None, institution: None });
        }
        // Every grant is compared, so the time taken does not say which one matched.
        let mut found = None;
        for g in &self.grants {
            if let Some(h) = &g.token_sha256 {
                if bool::from(digest.ct_eq(h)) {
                    found = Some(Self::principal(g));
                }
            }
        }
        found.ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", "the bearer token is not valid"))
    }

    /// The caller, if it presented a credential; a presented credential that matches
    /// nothing is a 401, not an anonymous request.
    pub fn authenticate(&self, headers: &HeaderMap, peer: Option<PeerCertificate>) -> Result<Option<Principal>, ApiError> {
        let bearer = headers.get(header::AUTHORIZATION).map(|v| v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim));
        let cookie = session_cookie(headers);
        let token = match (bearer, cookie) {
            (Some(None), _) => return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "the Authorization header must be \"Bearer TOKEN\"")),
            (Some(Some(t)), _) => Some(t.to_string()),
            (None, Some(c)) => Some(c),
            (None, None) => None,
        };
        if let Some(token) = token {
            return self.authenticate_token(&token).map(Some);
        }
        if let Some(PeerCertificate(fp)) = peer {
            if let Some(g) = self.grants.iter().find(|g| g.cert_spki_sha256.is_some_and(|h| bool::from(fp.ct_eq(&h)))) {
                return Ok(Some(Self::principal(g)));
            }
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unknown_certificate",
                format!("the client certificate (SPKI SHA-256 {}) is not configured", hex::encode(fp)),
            ));
        }
        Ok(None)
    }
}

/// The `tessera_session` cookie the login page sets (the same token, for browsers).
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

pub const SESSION_COOKIE: &str = "tessera_session";

/// Requires one of `roles`: 401 without credentials, 403 with the wrong role.
pub fn require(who: Option<Principal>, roles: &[Role], what: &str) -> Result<Principal, ApiError> {
    let p = who.ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", format!("{what} needs a bearer token or client certificate")))?;
    if roles.contains(&p.role) {
        Ok(p)
    } else {
        let allowed: Vec<String> = roles.iter().map(ToString::to_string).collect();
        Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("{what} is for role {}; {} has role {}", allowed.join(" or "), p.name, p.role)).by(&p))
    }
}

/// An institution reads only rounds it was on the roster of.
pub fn require_participant(p: &Principal, roster: &[String], round: u64) -> Result<(), ApiError> {
    if p.role != Role::Institution {
        return Ok(());
    }
    match &p.institution_key {
        Some(k) if roster.iter().any(|r| r.eq_ignore_ascii_case(k)) => Ok(()),
        _ => Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("{} did not take part in round {round}", p.name)).by(p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(access: Vec<AccessGrant>) -> ServerConfig {
        toml::from_str::<ServerConfig>(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"d\"\nadmin_token = \"admin-token-0123456789\"\n\n[[institutions]]\nname = \"c0\"\npublic_key = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
        )
        .map(|mut c| {
            c.access = access;
            c
        })
        .unwrap()
    }

    fn grant(name: &str, role: Role, token: &str) -> AccessGrant {
        AccessGrant { name: name.into(), role, institution: None, token_sha256: Some(hex::encode(token_sha256(token))), client_cert_spki_sha256: None }
    }

    #[test]
    fn a_credential_maps_to_one_principal() {
        assert!(validate(&cfg(vec![grant("a", Role::Auditor, "t1"), grant("b", Role::Auditor, "t2")])).is_ok());
        let twice = validate(&cfg(vec![grant("a", Role::Auditor, "t1"), grant("b", Role::Admin, "t1")])).unwrap_err();
        assert!(twice.contains("already given"), "{twice}");
        let admin = validate(&cfg(vec![grant("a", Role::Auditor, "admin-token-0123456789")])).unwrap_err();
        assert!(admin.contains("admin token"), "{admin}");
        let mut inst = grant("c", Role::Institution, "t3");
        assert!(validate(&cfg(vec![inst.clone()])).unwrap_err().contains("needs institution"));
        inst.institution = Some("nobody".into());
        assert!(validate(&cfg(vec![inst.clone()])).unwrap_err().contains("not in [[institutions]]"));
        inst.institution = Some("c0".into());
        assert!(validate(&cfg(vec![inst])).is_ok());
    }

    #[test]
    fn tokens_and_roles() {
        let c = cfg(vec![grant("aud", Role::Auditor, "auditor-token")]);
        let auth = Authenticator::new(&c);
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        let p = auth.authenticate(&headers("Bearer auditor-token"), None).unwrap().unwrap();
        assert_eq!((p.name.as_str(), p.role), ("aud", Role::Auditor));
        assert_eq!(auth.authenticate(&headers("Bearer admin-token-0123456789"), None).unwrap().unwrap().role, Role::Admin);
        assert_eq!(auth.authenticate(&headers("Bearer nope"), None).unwrap_err().code, "invalid_token");
        assert_eq!(auth.authenticate(&headers("Basic abc"), None).unwrap_err().status, StatusCode::UNAUTHORIZED);
        assert_eq!(auth.authenticate(&HeaderMap::new(), None).unwrap(), None);
        assert_eq!(require(Some(p.clone()), &[Role::Admin], "x").unwrap_err().status, StatusCode::FORBIDDEN);
        assert_eq!(require(None, &[Role::Admin], "x").unwrap_err().status, StatusCode::UNAUTHORIZED);
        assert!(require(Some(p), &[Role::Auditor], "x").is_ok());
    }
}
