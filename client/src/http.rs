//! HTTPS to the aggregator: rustls with the server's certificate pinned by its SHA-256
//! fingerprint (the dev certificate is self-signed), hyper HTTP/1.1 over one kept-alive
//! connection, whose certificate (pin and attestation evidence) is verified once, in its
//! handshake. A connection the server closed (idle, restarted) is replaced transparently,
//! and one older than [`MAX_CONNECTION_AGE`] is not reused, so the evidence behind it
//! is re-checked at that interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A kept-alive connection is used for new requests for at most this long; then a new
/// handshake verifies the server's (re-issued) certificate and evidence again.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// The idle connection of an [`Api`] and its clones, with when it was opened.
#[derive(Default)]
struct Pool {
    idle: tokio::sync::Mutex<Option<(Sender, Instant)>>,
    handshakes: AtomicU64,
    requests: AtomicU64,
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
    pool: Arc<Pool>,
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
        Ok(Api { host, port, fingerprint, connector, verifier, bearer: None, pool: Arc::default() })
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
        // Connections made without the certificate are not this client's.
        self.pool = Arc::default();
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

    /// TLS handshakes made so far by this client and its clones (each verifies the
    /// server's certificate), and requests sent over them.
    pub fn connection_counts(&self) -> (u64, u64) {
        (self.pool.handshakes.load(Ordering::Relaxed), self.pool.requests.load(Ordering::Relaxed))
    }

    /// The idle kept-alive connection, if it is still open and young enough.
    async fn pooled(&self) -> Option<(Sender, Instant)> {
        let (mut sender, opened) = self.pool.idle.lock().await.take()?;
        if opened.elapsed() > MAX_CONNECTION_AGE || sender.is_closed() {
            return None;
        }
        sender.ready().await.ok()?;
        Some((sender, opened))
    }

    async fn open(&self) -> Result<(Sender, Instant), HttpError> {
        let tls = self.connect_tls().await?;
        self.pool.handshakes.fetch_add(1, Ordering::Relaxed);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| HttpError::Exchange(e.to_string()))?;
        tokio::spawn(conn);
        Ok((sender, Instant::now()))
    }

    pub async fn request(&self, method: Method, path: impl Into<String>, body: Option<(&str, Bytes)>) -> Result<Bytes, HttpError> {
        let path: String = path.into();
        let addr = format!("{}:{}", self.host, self.port);
        let (content_type, payload) = match body {
            Some((ct, bytes)) => (Some(ct.to_string()), bytes),
            None => (None, Bytes::new()),
        };
        let build = || {
            let mut builder = Request::builder().method(method.clone()).uri(path.as_str()).header(hyper::header::HOST, &addr);
            if let Some(token) = &self.bearer {
                builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.as_str()));
            }
            if let Some(ct) = &content_type {
                builder = builder.header(hyper::header::CONTENT_TYPE, ct.as_str());
            }
            builder.body(Full::new(payload.clone())).map_err(|e| HttpError::Exchange(e.to_string()))
        };
        let (mut sender, opened, reused) = match self.pooled().await {
            Some((s, at)) => (s, at, true),
            None => {
                let (s, at) = self.open().await?;
                (s, at, false)
            }
        };
        self.pool.requests.fetch_add(1, Ordering::Relaxed);
        let resp = match sender.try_send_request(build()?).await {
            Ok(r) => r,
            // The server had closed a kept-alive connection before the request left (an
            // idle timeout, a restart): hyper hands the unsent request back, and it goes
            // once more on a fresh connection. A request that may have reached the server
            // is never repeated here.
            Err(e) if reused && e.message().is_some() => {
                let (s, at) = self.open().await?;
                sender = s;
                let r = sender.send_request(build()?).await.map_err(|e| HttpError::Exchange(e.to_string()))?;
                return self.finish(r, sender, at).await;
            }
            Err(e) => return Err(HttpError::Exchange(e.into_error().to_string())),
        };
        self.finish(resp, sender, opened).await
    }

    /// Reads the response, hands the connection back for the next request, and maps
    /// error statuses to [`HttpError::Status`].
    async fn finish(&self, resp: hyper::Response<hyper::body::Incoming>, sender: Sender, opened: Instant) -> Result<Bytes, HttpError> {
        let status = resp.status();
        let keep = !resp.headers().get(hyper::header::CONNECTION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let bytes = resp.into_body().collect().await.map_err(|e| HttpError::Exchange(e.to_string()))?.to_bytes();
        if keep && !sender.is_closed() {
            let mut idle = self.pool.idle.lock().await;
            if idle.is_none() {
                *idle = Some((sender, opened));
            }
        }
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
        self.request(Method::POST, path, Some(("application/json", Bytes::from(bytes)))).await
    }

    /// Posts a binary body; a `Bytes` body is shared, not copied, by every attempt.
    pub async fn post_bytes(&self, path: impl Into<String>, body: impl Into<Bytes>) -> Result<Bytes, HttpError> {
        self.request(Method::POST, path, Some(("application/octet-stream", body.into()))).await
    }
}
