//! TLS is always on. On first start a TLS key is generated in memory and stored only
//! sealed under the enclave's sealing key (`tls/key.sealed`), like the identity key: the
//! host never holds it in the clear, so a copy of the data directory does not let it
//! terminate TLS as the enclave (and every protocol message is signed by the enclave's
//! identity key besides). At every start, and then every `certificate_refresh_secs`, a
//! self-signed certificate for it is issued carrying fresh evidence of the enclave
//! (attested TLS, see `tessera_attestation::ratls`), so the evidence a handshake sees
//! stays within a verifier's `max_age_secs` and its collateral current. Institutions pin
//! the SHA-256 of the public key (printed at start; stable across restarts) and/or check
//! the evidence in the handshake.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

pub struct TlsIdentity {
    pub cert_der: Vec<u8>,
    key_der: Vec<u8>,
    /// SHA-256 of the SubjectPublicKeyInfo: stable across restarts, what clients pin.
    pub fingerprint: [u8; 32],
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsIdentity {{ fingerprint: {} }}", hex::encode(self.fingerprint))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS files in {dir}: {why}")]
    Files { dir: String, why: String },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's long-lived TLS key, held in memory; on disk only sealed.
pub struct TlsKey {
    key_pem: zeroize::Zeroizing<String>,
    dir: std::path::PathBuf,
    /// SHA-256 of the SubjectPublicKeyInfo.
    pub spki_sha256: [u8; 32],
}

impl std::fmt::Debug for TlsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsKey {{ spki_sha256: {} }}", hex::encode(self.spki_sha256))
    }
}

const NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
const SEALED_KEY_FILE: &str = "key.sealed";
/// The most one connection's HTTP read buffer holds (see `serve`).
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Where earlier versions kept the key in the clear.
const PLAINTEXT_KEY_FILE: &str = "key.pem";
const TLS_KEY_AAD: &[u8] = b"tessera/tls-key/v1";

/// Loads the sealed TLS key from `dir`, or generates one and stores it sealed. A key left
/// in the clear by an earlier version is not trusted (the host could have copied it): it
/// is deleted and a new key generated, with a warning that the pinned fingerprint changes.
pub fn load_or_create_key(dir: &Path, sealing: &tessera_enclave::SealingKey) -> Result<TlsKey, TlsError> {
    let err = |why: String| TlsError::Files { dir: dir.display().to_string(), why };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let sealed_path = dir.join(SEALED_KEY_FILE);
    let plaintext = dir.join(PLAINTEXT_KEY_FILE);
    if plaintext.exists() {
        std::fs::remove_file(&plaintext).map_err(|e| err(format!("cannot remove the unsealed {}: {e}", plaintext.display())))?;
        let _ = std::fs::remove_file(&sealed_path);
        tracing::warn!(path = %plaintext.display(), "removed a TLS key stored unsealed by an earlier version; a new sealed key is generated and the TLS fingerprint institutions pin CHANGES");
    }
    let key_pem = if sealed_path.exists() {
        let sealed = std::fs::read(&sealed_path).map_err(|e| err(e.to_string()))?;
        let plain = sealing.unseal(TLS_KEY_AAD, &sealed).map_err(|_| {
            err(format!(
                "the TLS key {} does not unseal: it was sealed by another build (measurement), on another chip, under another key file, \
                     or altered. Start this version with a new data_dir (institutions then pin the new fingerprint)",
                sealed_path.display()
            ))
        })?;
        zeroize::Zeroizing::new(String::from_utf8(plain.to_vec()).map_err(|_| err("the sealed TLS key is not PEM".into()))?)
    } else {
        let key = rcgen::KeyPair::generate()?;
        let pem = zeroize::Zeroizing::new(key.serialize_pem());
        tessera_attestation::keyfile::write_private(&sealed_path, &sealing.seal(TLS_KEY_AAD, pem.as_bytes()), false).map_err(|e| err(e.to_string()))?;
        tracing::info!(path = %sealed_path.display(), "generated the server's TLS key (stored sealed)");
        pem
    };
    let key = rcgen::KeyPair::from_pem(&key_pem)?;
    // The SPKI hash is read back from a certificate so it is exactly what clients see.
    let probe = rcgen::CertificateParams::new(NAMES.map(String::from).to_vec())?.self_signed(&key)?;
    let spki_sha256 = tessera_attestation::ratls::spki_sha256(probe.der()).map_err(|e| err(e.to_string()))?;
    Ok(TlsKey { key_pem, dir: dir.to_path_buf(), spki_sha256 })
}

/// Issues a self-signed certificate for the key, carrying `evidence` in the Tessera
/// evidence extension (attested TLS), and writes it to `cert.pem` for operators.
pub fn issue_certificate(key: &TlsKey, evidence: Option<&tessera_attestation::ratls::CertEvidence>) -> Result<TlsIdentity, TlsError> {
    let err = |why: String| TlsError::Files { dir: key.dir.display().to_string(), why };
    let pair = rcgen::KeyPair::from_pem(&key.key_pem)?;
    let mut params = rcgen::CertificateParams::new(NAMES.map(String::from).to_vec())?;
    if let Some(ev) = evidence {
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(tessera_attestation::ratls::EVIDENCE_OID, tessera_attestation::ratls::encode_extension(ev)));
    }
    let cert = params.self_signed(&pair)?;
    std::fs::write(key.dir.join("cert.pem"), cert.pem()).map_err(|e| err(e.to_string()))?;
    Ok(TlsIdentity { cert_der: cert.der().to_vec(), key_der: pair.serialize_der(), fingerprint: key.spki_sha256 })
}

pub fn server_config(certificate: Arc<RotatingCertificate>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(OptionalClientCert { provider }))
        .with_cert_resolver(certificate);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The certificate new handshakes get; replaced when the evidence is refreshed
/// (connections already open keep theirs).
#[derive(Debug)]
pub struct RotatingCertificate {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

fn certified_key(id: &TlsIdentity) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let key = PrivateKeyDer::try_from(id.key_der.clone()).map_err(|e| TlsError::Files { dir: "key".into(), why: e.to_string() })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(vec![CertificateDer::from(id.cert_der.clone())], signer)))
}

impl RotatingCertificate {
    pub fn new(id: &TlsIdentity) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(RotatingCertificate { current: std::sync::RwLock::new(certified_key(id)?) }))
    }

    pub fn replace(&self, id: &TlsIdentity) -> Result<(), TlsError> {
        let next = certified_key(id)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for RotatingCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// Asks for a client certificate but does not require one. A presented certificate
/// must prove possession of its key (the handshake signature is verified); which keys
/// mean what is decided by SPKI pinning in [`crate::auth`], not by a CA.
#[derive(Debug)]
struct OptionalClientCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::server::danger::ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        tessera_attestation::ratls::spki_sha256(end_entity).map_err(|e| rustls::Error::General(format!("client certificate: {e}")))?;
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts TLS connections and serves `app` on each until `shutdown` completes.
/// Each completed handshake is counted in `metrics` (`tessera_tls_handshakes_total`).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: crate::config::Limits,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let header_timeout = std::time::Duration::from_millis(limits.header_read_timeout_ms.max(1));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // At the cap, a new connection is closed before any work is done for it.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, max = limits.max_connections, "connection refused: at the connection cap");
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            metrics.tls_handshakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // The client certificate's SPKI hash, if one was presented, rides on every request.
            let peer_cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| tessera_attestation::ratls::spki_sha256(c).ok())
                .map(crate::auth::PeerCertificate);
            let app = tower::ServiceExt::map_request(app, move |mut req: axum::http::Request<hyper::body::Incoming>| {
                if let Some(p) = peer_cert {
                    req.extensions_mut().insert(p);
                }
                req
            });
            let service = TowerToHyperService::new(app);
            let mut http = hyper::server::conn::http1::Builder::new();
            // hyper's read buffer grows to about 400 KiB on a fast upload by default, on
            // every connection at once; 64 KiB reads as fast from loopback and TLS, and
            // still holds any request head this API accepts.
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(READ_BUFFER_BYTES);
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
