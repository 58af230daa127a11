//! TLS is always on. On first start a self-signed certificate is generated into the data
//! directory and its SHA-256 fingerprint printed; institutions pin that fingerprint (or,
//! with attested TLS, the aggregator's evidence vouches for it).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

pub struct TlsIdentity {
    pub cert_der: Vec<u8>,
    key_der: Vec<u8>,
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

pub fn load_or_create(dir: &Path) -> Result<TlsIdentity, TlsError> {
    let err = |why: String| TlsError::Files { dir: dir.display().to_string(), why };
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert_path.exists() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])?;
        write_private(&key_path, ck.key_pair.serialize_pem().as_bytes()).map_err(|e| err(e.to_string()))?;
        std::fs::write(&cert_path, ck.cert.pem()).map_err(|e| err(e.to_string()))?;
        tracing::info!(path = %cert_path.display(), "generated a self-signed development certificate");
    }
    let cert_pem = std::fs::read(&cert_path).map_err(|e| err(e.to_string()))?;
    let key_pem = std::fs::read(&key_path).map_err(|e| err(e.to_string()))?;
    let cert_der = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .next()
        .ok_or_else(|| err("cert.pem holds no certificate".into()))?
        .map_err(|e| err(e.to_string()))?
        .to_vec();
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice()).map_err(|e| err(e.to_string()))?.ok_or_else(|| err("key.pem holds no key".into()))?;
    let key_der = key.secret_der().to_vec();
    let fingerprint = Sha256::digest(&cert_der).into();
    Ok(TlsIdentity { cert_der, key_der, fingerprint })
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    opts.open(path)?.write_all(bytes)
}

pub fn server_config(id: &TlsIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::try_from(id.key_der.clone()).map_err(|e| TlsError::Files { dir: "key".into(), why: e.to_string() })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(id.cert_der.clone())], key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts TLS connections and serves `app` on each until `shutdown` completes.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Router, shutdown: impl Future<Output = ()>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
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
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
