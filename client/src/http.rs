//! HTTPS to the aggregator: rustls with the server's certificate pinned by its SHA-256
//! fingerprint (the dev certificate is self-signed), hyper HTTP/1.1, one connection per
//! request so a restarted server is simply reconnected to.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    #[error("TLS handshake with {addr} failed: {why}")]
    Tls { addr: String, why: String },
    #[error("HTTP exchange failed: {0}")]
    Exchange(String),
    #[error("server answered {status} {code}: {message}")]
    Status { status: StatusCode, code: String, message: String, body: String },
    #[error("unexpected response: {0}")]
    Decode(String),
    #[error("invalid server URL {0:?}: expected https://HOST:PORT")]
    Url(String),
}

impl HttpError {
    /// Whether retrying later can help (the server is down or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Connect { .. } | HttpError::Exchange(_) => true,
            HttpError::Status { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE || *status == StatusCode::BAD_GATEWAY,
            _ => false,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            HttpError::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Checks the aggregator's certificate inside the handshake: its public key must match
/// the pin (SHA-256 of the SubjectPublicKeyInfo), and with a policy, the evidence it
/// carries must verify, be bound to that key, and meet the policy (attested TLS).
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    policy: Option<tessera_attestation::policy::NodePolicy>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = tessera_attestation::ratls::spki_sha256(end_entity.as_ref()).map_err(|e| rustls::Error::General(e.to_string()))?;
        if !ct::constant_time_eq(&got, &self.fingerprint) {
            return Err(rustls::Error::General(format!(
                "server public key fingerprint is {}, but {} was pinned (wrong server, or its key changed)",
                hex::encode(got),
                hex::encode(self.fingerprint)
            )));
        }
        if let Some(policy) = &self.policy {
            let (verdict, _) = tessera_attestation::ratls::verify_certificate(end_entity.as_ref(), policy, now.as_secs());
            if !verdict.accepted {
                return Err(rustls::Error::General(format!("aggregator attestation refused in the TLS handshake: {}", verdict.reasons())));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

mod ct {
    pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

#[derive(Clone)]
pub struct Api {
    host: String,
    port: u16,
    fingerprint: [u8; 32],
    connector: tokio_rustls::TlsConnector,
    verifier: Arc<PinnedCert>,
    /// Sent as `Authorization: Bearer …` (compliance endpoints); zeroized on drop.
    bearer: Option<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Api(https://{}:{})", self.host, self.port)
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
}

impl Api {
    /// HTTPS to `url`, pinning the server's public key (SHA-256 of its SPKI).
    pub fn new(url: &str, fingerprint: [u8; 32]) -> Result<Api, HttpError> {
        Self::attested(url, fingerprint, None)
    }

    /// As [`Api::new`], and with `policy` the server's certificate must also carry
    /// evidence that meets it (checked in every handshake).
    pub fn attested(url: &str, fingerprint: [u8; 32], policy: Option<tessera_attestation::policy::NodePolicy>) -> Result<Api, HttpError> {
        let rest = url.strip_prefix("https://").ok_or_else(|| HttpError::Url(url.into()))?.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| HttpError::Url(url.into()))?;
        let port: u16 = port.parse().map_err(|_| HttpError::Url(url.into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err(HttpError::Url(url.into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(PinnedCert { fingerprint, policy, provider: provider.clone() });
        let connector = Self::connector(url, &verifier, None)?;
        Ok(Api { host, port, fingerprint, connector, verifier, bearer: None })
    }

    fn connector(url: &str, verifier: &Arc<PinnedCert>, client_cert: Option<(Vec<u8>, Vec<u8>)>) -> Result<tokio_rustls::TlsConnector, HttpError> {
        let tls_err = |e: rustls::Error| HttpError::Tls { addr: url.into(), why: e.to_string() };
        let builder = rustls::ClientConfig::builder_with_provider(verifier.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let mut cfg = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let key = rustls::pki_types::PrivateKeyDer::try_from(key).map_err(|e| HttpError::Tls { addr: url.into(), why: format!("client key: {e}") })?;
                builder.with_client_auth_cert(vec![rustls::pki_types::CertificateDer::from(cert)], key).map_err(tls_err)?
            }
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    }

    /// Authenticates every request with a bearer token (roles for the compliance API).
    pub fn with_bearer(mut self, token: &str) -> Api {
        self.bearer = Some(zeroize::Zeroizing::new(token.to_string()));
        self
    }

    /// Presents a client certificate (DER) with its PKCS#8 key (DER) in every handshake
    /// (mTLS; the server pins its public key to a role).
    pub fn with_client_certificate(mut self, cert_der: Vec<u8>, key_der: Vec<u8>) -> Result<Api, HttpError> {
        self.connector = Self::connector(&self.base_url(), &self.verifier, Some((cert_der, key_der)))?;
        Ok(self)
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    pub fn base_url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }

    /// A TLS connection to the server, its certificate checked as for every request
    /// (the pin, and the evidence policy if any); the caller speaks HTTP over it.
    pub async fn connect_tls(&self) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, HttpError> {
        let addr = format!("{}:{}", self.host, self.port);
        let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| HttpError::Connect { addr: addr.clone(), why: "timed out".into() })?
            .map_err(|e| HttpError::Connect { addr: addr.clone(), why: e.to_string() })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|e| HttpError::Url(e.to_string()))?;
        let tls = self.connector.connect(name, tcp).await.map_err(|e| {
            // A handshake cut by a restarting server is transient; a failed verification is not.
            if e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).is_some() {
                HttpError::Tls { addr: addr.clone(), why: e.to_string() }
            } else {
                HttpError::Connect { addr: addr.clone(), why: e.to_string() }
            }
        })?;
        Ok(tls)
    }

    pub async fn request(&self, method: Method, path: impl Into<String>, body: Option<(&str, Vec<u8>)>) -> Result<Bytes, HttpError> {
        let path: String = path.into();
        let addr = format!("{}:{}", self.host, self.port);
        let tls = self.connect_tls().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| HttpError::Exchange(e.to_string()))?;
        tokio::spawn(conn);
        let mut builder = Request::builder().method(method).uri(path.as_str()).header(hyper::header::HOST, &addr);
        if let Some(token) = &self.bearer {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.as_str()));
        }
        let payload = match body {
            Some((ct, bytes)) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, ct);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let req = builder.body(Full::new(payload)).map_err(|e| HttpError::Exchange(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| HttpError::Exchange(e.to_string()))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| HttpError::Exchange(e.to_string()))?.to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let text = String::from_utf8_lossy(&bytes).to_string();
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (b.error, b.message),
            Err(_) => ("unknown".into(), text.clone()),
        };
        Err(HttpError::Status { status, code, message, body: text })
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: impl Into<String>) -> Result<T, HttpError> {
        let path: String = path.into();
        let bytes = self.request(Method::GET, path.clone(), None).await?;
        serde_json::from_slice(&bytes).map_err(|e| HttpError::Decode(format!("{path}: {e}")))
    }

    pub async fn get_bytes(&self, path: impl Into<String>) -> Result<Bytes, HttpError> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post_json<B: serde::Serialize>(&self, path: impl Into<String>, body: &B) -> Result<Bytes, HttpError> {
        let bytes = serde_json::to_vec(body).map_err(|e| HttpError::Decode(e.to_string()))?;
        self.request(Method::POST, path, Some(("application/json", bytes))).await
    }

    pub async fn post_bytes(&self, path: impl Into<String>, body: Vec<u8>) -> Result<Bytes, HttpError> {
        self.request(Method::POST, path, Some(("application/octet-stream", body))).await
    }
}
