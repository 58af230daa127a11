//! Attestation for Tessera: evidence formats, verification, and node policy.
//!
//! Three steps, three error kinds, and the time is always an argument:
//! 1. **parse and verify** the evidence of one format against its endorsements
//!    ([`Verifier::verify`] → [`Claims`] or [`VerifyError`]);
//! 2. **check the binding**: the evidence's report data must equal the 64 bytes derived
//!    from the keys it vouches for (see `tessera_secagg::client::key_binding`);
//! 3. **apply policy** ([`policy::NodePolicy::evaluate`] → [`policy::Verdict`] naming
//!    every failed check).
//!
//! Formats plug in as a small table ([`registry`]): detect, verify. This crate ships the
//! simulated dev format ([`dev`]), which is INSECURE and rejected by default policy, AMD
//! SEV-SNP ([`snp`]), Intel DCAP quotes ([`dcap`]: TDX and SGX) and AWS Nitro Enclaves
//! attestation documents ([`nitro`]).

pub mod audit;
pub mod binding;
pub mod bundle;
pub mod dcap;
pub mod dev;
pub mod keyfile;
pub mod nitro;
pub mod policy;
pub mod ratls;
pub mod snp;
pub mod translog;
pub mod tsm;

use serde::{Deserialize, Serialize};

/// The evidence formats Tessera knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Simulated evidence for machines without a TEE. Proves nothing.
    DevInsecure,
    SevSnp,
    Tdx,
    SgxDcap,
    AwsNitro,
}

impl Format {
    pub fn is_insecure(self) -> bool {
        matches!(self, Format::DevInsecure)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::DevInsecure => "dev-insecure (SIMULATED, NO HARDWARE GUARANTEE)",
            Format::SevSnp => "amd-sev-snp",
            Format::Tdx => "intel-tdx",
            Format::SgxDcap => "intel-sgx-dcap",
            Format::AwsNitro => "aws-nitro",
        })
    }
}

/// What verified evidence says about the attested node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub format: Format,
    /// Launch measurement (SNP MEASUREMENT, TDX MRTD, SGX MRENCLAVE, Nitro PCR0, dev: SHA-384 of the binary), hex.
    pub measurement: String,
    /// 64 bytes the attested code chose to bind (report_data / user_data), hex.
    pub report_data: String,
    pub debug: bool,
    /// Seconds since the Unix epoch at which the evidence was produced, where the format says.
    pub issued_at: Option<u64>,
    /// Platform TCB as the format states it (SNP reported TCB, DCAP TCB status, …), if any.
    #[serde(default)]
    pub tcb: Option<String>,
    /// Who signed the evidence (e.g. the VCEK/VLEK subject, the PCK, the Nitro leaf certificate).
    #[serde(default)]
    pub signer: Option<String>,
    /// Every other decoded field, by its specification name (hex for byte strings).
    #[serde(default)]
    pub fields: std::collections::BTreeMap<String, String>,
}

/// Why evidence failed verification (step 1). Each variant names the failing check.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
    #[error("evidence format not recognised")]
    UnknownFormat,
    #[error("malformed {format:?} evidence: {why}")]
    Malformed { format: Format, why: String },
    #[error("{format:?}: a required endorsement is missing: {what}")]
    MissingEndorsement { format: Format, what: String },
    #[error("{format:?}: signature over {what} does not verify")]
    BadSignature { format: Format, what: String },
    #[error("{format:?}: certificate chain is invalid: {why}")]
    CertificateChain { format: Format, why: String },
    #[error("{format:?}: the chain does not end at a pinned vendor root")]
    UntrustedRoot { format: Format },
    /// The evidence came with endorsements where the format takes none: they could only
    /// name a trust root, and roots come from the verifier's configuration, never from
    /// the attested peer.
    #[error("{format:?}: the evidence supplies {count} endorsement(s) of its own; this format takes none, and trust roots come only from the verifier's configuration")]
    PeerSuppliedRoot { format: Format, count: usize },
    #[error("{format:?}: {what} is not valid at the verification time")]
    NotValidAtTime { format: Format, what: String },
    #[error("{format:?}: {what} is revoked")]
    Revoked { format: Format, what: String },
    #[error("{format:?}: TCB check failed: {status}")]
    Tcb { format: Format, status: String },
}

impl VerifyError {
    /// The format the evidence was recognised as, if it was.
    pub fn format(&self) -> Option<Format> {
        match self {
            VerifyError::UnknownFormat => None,
            VerifyError::Malformed { format, .. }
            | VerifyError::MissingEndorsement { format, .. }
            | VerifyError::BadSignature { format, .. }
            | VerifyError::CertificateChain { format, .. }
            | VerifyError::UntrustedRoot { format }
            | VerifyError::PeerSuppliedRoot { format, .. }
            | VerifyError::NotValidAtTime { format, .. }
            | VerifyError::Revoked { format, .. }
            | VerifyError::Tcb { format, .. } => Some(*format),
        }
    }
}

/// One evidence format: recognise it, and verify it at a given time.
pub trait Verifier: Send + Sync {
    fn format(&self) -> Format;
    fn detect(&self, evidence: &[u8]) -> bool;
    fn verify(&self, evidence: &[u8], endorsements: &[Vec<u8>], now_secs: u64) -> Result<Claims, VerifyError>;
}

/// Produces evidence over 64 bytes of report data on this node.
pub trait Attester: Send + Sync {
    fn format(&self) -> Format;
    fn attest(&self, report_data: &[u8; 64], now_secs: u64) -> Result<Vec<u8>, AttestError>;
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("attestation is unavailable on this machine: {0}")]
    Unavailable(String),
    #[error("the attestation interface failed: {0}")]
    Interface(String),
}

/// The verifiers this build knows, in detection order.
pub fn registry() -> Vec<Box<dyn Verifier>> {
    vec![
        Box::new(dev::DevVerifier),
        Box::new(snp::SnpVerifier),
        Box::new(dcap::DcapVerifier::tdx()),
        Box::new(dcap::DcapVerifier::sgx()),
        Box::new(nitro::NitroVerifier),
    ]
}

/// Decodes `evidence` without verifying anything and returns every field, for display.
pub fn inspect(evidence: &[u8]) -> Result<(Format, String), VerifyError> {
    if bundle::EvidenceBundle::detect(evidence) {
        let inner = bundle::EvidenceBundle::decode(evidence)?;
        let (format, text) = inspect(&inner.evidence)?;
        return Ok((
            format,
            format!(
                "{text}\nendorsements in the bundle: {} (sizes {:?})",
                inner.endorsements.len(),
                inner.endorsements.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        ));
    }
    if dev::DevVerifier.detect(evidence) {
        let v: serde_json::Value = serde_json::from_slice(evidence).map_err(|e| VerifyError::Malformed { format: Format::DevInsecure, why: e.to_string() })?;
        return Ok((Format::DevInsecure, serde_json::to_string_pretty(&v).unwrap_or_default()));
    }
    if nitro::looks_like_cose_sign1(evidence) {
        let doc = nitro::SignedAttestationDocument::parse(evidence)?;
        return Ok((Format::AwsNitro, format!("{:#?}", doc.document())));
    }
    if let Some(tee) = dcap::detect_tee(evidence) {
        return Ok((tee.format(), format!("{:#?}", dcap::parse_quote(evidence)?)));
    }
    if evidence.len() == 0x4A0 {
        let report = snp::AttestationReport::parse(evidence)?;
        let fields: String = report.fields().iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        return Ok((Format::SevSnp, format!("{report:#?}\n{fields}")));
    }
    if let Ok(hcl) = snp::AzureHclReport::parse(evidence) {
        let fields: String = hcl.report.fields().iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        return Ok((Format::SevSnp, format!("Azure HCL report, user_data {:?}\n{fields}", hcl.user_data())));
    }
    Err(VerifyError::UnknownFormat)
}

/// Trust anchors the *verifier* configured besides the pinned vendor roots (a policy's
/// `additional_snp_arks` / `additional_nitro_roots`): PEM or DER certificates, for test
/// chains. Nothing in an evidence bundle can add to them.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConfiguredRoots<'a> {
    pub snp_arks: &'a [&'a [u8]],
    pub nitro_roots: &'a [&'a [u8]],
}

/// Detects the format of `evidence` and verifies it against the pinned vendor roots. An
/// [`bundle::EvidenceBundle`] is unwrapped first; its endorsements come before the ones
/// given here.
pub fn verify(evidence: &[u8], endorsements: &[Vec<u8>], now_secs: u64) -> Result<Claims, VerifyError> {
    verify_trusting(evidence, endorsements, ConfiguredRoots::default(), now_secs)
}

/// [`verify`], with `roots` trusted besides the pinned vendor roots.
pub fn verify_trusting(evidence: &[u8], endorsements: &[Vec<u8>], roots: ConfiguredRoots<'_>, now_secs: u64) -> Result<Claims, VerifyError> {
    if bundle::EvidenceBundle::detect(evidence) {
        let inner = bundle::EvidenceBundle::decode(evidence)?;
        if bundle::EvidenceBundle::detect(&inner.evidence) {
            return Err(VerifyError::Malformed { format: Format::DevInsecure, why: "nested evidence bundles".into() });
        }
        let all: Vec<Vec<u8>> = inner.endorsements.iter().chain(endorsements).cloned().collect();
        return verify_trusting(&inner.evidence, &all, roots, now_secs);
    }
    if !roots.snp_arks.is_empty() && snp::SnpVerifier.detect(evidence) {
        let anchors: Vec<&[u8]> = snp::PINNED_ARKS.iter().map(|(_, pem)| *pem).chain(roots.snp_arks.iter().copied()).collect();
        return snp::verify_with_roots(evidence, endorsements, &anchors, now_secs);
    }
    if nitro::looks_like_cose_sign1(evidence) {
        return nitro::verify_with_roots(evidence, endorsements, roots.nitro_roots, now_secs);
    }
    registry().into_iter().find(|v| v.detect(evidence)).ok_or(VerifyError::UnknownFormat)?.verify(evidence, endorsements, now_secs)
}
