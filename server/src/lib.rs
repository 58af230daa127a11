//! Tessera's aggregator host: the untrusted shell around the enclave. It terminates TLS
//! (axum over rustls), speaks the REST API, persists every accepted message in SQLite
//! before acknowledging it, and measures request latency. It routes bytes to
//! `tessera_enclave` and never computes on an update itself.

pub mod api;
pub mod auth;
pub mod cli;
pub mod compliance;
pub mod config;
pub mod error;
pub mod malloc;
pub mod metrics;
pub mod pages;
pub mod service;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use config::ServerConfig;
pub use service::Service;

/// A running server: its address, certificate fingerprint and enclave identity.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub fingerprint: [u8; 32],
    pub service: Arc<Service>,
    shutdown: tokio::sync::watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Re-issues the TLS certificate with evidence made now.
async fn refresh_certificate(service: &Service, key: &tls::TlsKey, certificate: &tls::RotatingCertificate) -> anyhow::Result<()> {
    service.refresh_evidence().await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    certificate.replace(&attested_certificate(service, key)?)?;
    tracing::debug!("attested certificate refreshed");
    Ok(())
}

/// A certificate for `key` carrying the service's current evidence.
fn attested_certificate(service: &Service, key: &tls::TlsKey) -> Result<tls::TlsIdentity, tls::TlsError> {
    let info = service.attestation();
    let evidence = tessera_attestation::ratls::CertEvidence { identity_public_key: info.identity_public_key, evidence: info.evidence };
    tls::issue_certificate(key, Some(&evidence))
}

/// Binds, starts the enclave (resuming an interrupted round), and serves in the
/// background.
pub async fn spawn(cfg: ServerConfig) -> anyhow::Result<Running> {
    spawn_inner(cfg, None).await
}

/// [`spawn`] with the given attestation and sealing backend instead of the configured one.
pub async fn spawn_with(cfg: ServerConfig, backend: service::TeeBackend) -> anyhow::Result<Running> {
    spawn_inner(cfg, Some(backend)).await
}

async fn spawn_inner(cfg: ServerConfig, backend: Option<service::TeeBackend>) -> anyhow::Result<Running> {
    let backend = match backend {
        Some(backend) => backend,
        None => service::TeeBackend::from_config_off_workers(&cfg).await?,
    };
    let key = tls::load_or_create_key(&cfg.data_dir.join("tls"), &backend.sealing)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let service = Service::start_with(cfg, key.spki_sha256, backend).await?;
    let tls = attested_certificate(&service, &key)?;
    let certificate = tls::RotatingCertificate::new(&tls)?;
    let server_tls = tls::server_config(certificate.clone())?;
    let refresh_every = Duration::from_secs(service.config().certificate_refresh_secs);
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let app = api::app(service.clone());
    let limits = service.config().limits;
    let metrics = service.metrics.clone();
    let ticker = service.clone();
    let mut tick_rx = tx.subscribe();
    let task = tokio::spawn(async move {
        let tick = tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + refresh_every, refresh_every);
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        if let Err(e) = ticker.tick().await {
                            tracing::error!(error = %e.message, "tick failed");
                        }
                    }
                    _ = refresh.tick() => {
                        // On failure the current certificate stays: verifiers see its age,
                        // and the next refresh tries again.
                        if let Err(e) = refresh_certificate(&ticker, &key, &certificate).await {
                            tracing::error!(error = %e, "could not refresh the attested certificate");
                        }
                    }
                    _ = tick_rx.changed() => return,
                }
            }
        });
        tls::serve(listener, server_tls, app, limits, metrics, async move {
            let _ = rx.changed().await;
        })
        .await;
        tick.abort();
    });
    Ok(Running { addr, fingerprint: tls.fingerprint, service, shutdown: tx, task })
}
