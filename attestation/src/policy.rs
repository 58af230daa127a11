//! Node policy: which verified evidence is acceptable. Evaluation never stops at the
//! first problem; the [`Verdict`] names every failed check so an operator (or an
//! auditor's script) sees all of them at once.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::{Claims, Format};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodePolicy {
    /// Accept simulated evidence. Never true in production; printed loudly when it is.
    pub allow_insecure_dev: bool,
    /// Accepted launch measurements (hex). Empty means any measurement, which is only
    /// sensible together with dev evidence on a developer machine.
    pub allowed_measurements: Vec<String>,
    pub allow_debug: bool,
    /// Evidence older than this many seconds is refused.
    pub max_age_secs: u64,
    /// DCAP TCB statuses accepted (e.g. `["UpToDate", "SWHardeningNeeded"]`); empty: any.
    /// Applies to evidence that states a `TCB_STATUS`.
    pub allowed_tcb_status: Vec<String>,
    /// Minimum values of numeric claim fields, by name: DCAP `QE_ISVSVN`, `PCK_PCESVN`,
    /// SGX `ISVSVN`, SNP `guest_svn`; SNP TCB components as `reported_tcb.boot_loader`,
    /// `reported_tcb.tee`, `reported_tcb.snp`, `reported_tcb.microcode`. A named field the
    /// evidence lacks is a failure.
    pub min_svn: std::collections::BTreeMap<String, u64>,
    /// SEV-SNP trust anchors besides AMD's pinned ARKs (PEM certificates). For a lab's
    /// TEST chain only: a production policy leaves this empty, and `tessera-attest`
    /// warns whenever a policy sets it.
    pub additional_snp_arks: Vec<String>,
    /// AWS Nitro trust anchors besides the pinned AWS root (PEM certificates), for a
    /// private TEST root only; warned about like `additional_snp_arks`. A root inside an
    /// evidence bundle is never trusted.
    pub additional_nitro_roots: Vec<String>,
}

impl Default for NodePolicy {
    fn default() -> Self {
        NodePolicy {
            allow_insecure_dev: false,
            allowed_measurements: Vec::new(),
            allow_debug: false,
            max_age_secs: 3600,
            allowed_tcb_status: Vec::new(),
            min_svn: Default::default(),
            additional_snp_arks: Vec::new(),
            additional_nitro_roots: Vec::new(),
        }
    }
}

/// One failed check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "check", rename_all = "snake_case")]
pub enum PolicyFailure {
    #[error("no evidence was presented")]
    MissingEvidence,
    #[error("evidence did not verify: {reason}")]
    Unverified { reason: String },
    #[error("simulated (dev) evidence is not allowed by this policy")]
    InsecureDevEvidence,
    #[error("measurement {measurement} is not in the allowed list")]
    MeasurementNotAllowed { measurement: String },
    #[error("debug-mode evidence is not allowed")]
    DebugMode,
    #[error("evidence is {age_secs} s old, the maximum is {max_age_secs} s")]
    TooOld { age_secs: u64, max_age_secs: u64 },
    #[error("evidence is not bound to the presented keys (report_data mismatch)")]
    ReportDataMismatch,
    #[error("TCB status {status} is not in the allowed list")]
    TcbStatusNotAllowed { status: String },
    #[error("{field} is {value}, the policy requires at least {minimum}")]
    SvnTooLow { field: String, value: u64, minimum: u64 },
    #[error("the evidence states no numeric {field}, which the policy requires")]
    SvnMissing { field: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub accepted: bool,
    pub format: Option<Format>,
    pub claims: Option<Claims>,
    pub failures: Vec<PolicyFailure>,
}

impl Verdict {
    pub fn reasons(&self) -> String {
        self.failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    }
}

impl NodePolicy {
    /// A policy for a developer machine: dev evidence accepted, any measurement.
    pub fn insecure_dev() -> Self {
        NodePolicy { allow_insecure_dev: true, ..NodePolicy::default() }
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks what TOML cannot: each `additional_snp_arks` / `additional_nitro_roots`
    /// entry is PEM holding a self-signed X.509 certificate.
    pub fn validate(&self) -> Result<(), String> {
        for (name, list) in [("additional_snp_arks", &self.additional_snp_arks), ("additional_nitro_roots", &self.additional_nitro_roots)] {
            for (i, pem) in list.iter().enumerate() {
                let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
                    .next()
                    .ok_or_else(|| format!("{name}[{i}] holds no PEM block"))?
                    .map_err(|e| format!("{name}[{i}]: bad PEM: {e}"))?;
                let cert = block.parse_x509().map_err(|e| format!("{name}[{i}]: not an X.509 certificate: {e}"))?;
                if cert.subject() != cert.issuer() {
                    return Err(format!("{name}[{i}] ({}) is not a self-signed root", cert.subject()));
                }
            }
        }
        Ok(())
    }

    /// The one rule for every verifier of code (a client checking the aggregator, an
    /// auditor): outside dev mode a policy must name the measurements it accepts, since
    /// without them any vendor-signed guest passes, whatever code it runs. `whom` names
    /// the attested party in the error.
    pub fn require_pinned_code(&self, whom: &str) -> Result<(), String> {
        if self.allow_insecure_dev || !self.allowed_measurements.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the policy for {whom} accepts any measurement: outside dev mode it must list the allowed_measurements of the code you trust (pass a policy file), or any vendor-signed guest would pass whatever code it runs"
        ))
    }

    /// A warning to print wherever a policy is loaded, when it trusts roots besides the
    /// vendors'.
    pub fn extra_roots_warning(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.additional_snp_arks.is_empty() {
            parts.push(format!("{} SEV-SNP root(s) besides AMD's (additional_snp_arks)", self.additional_snp_arks.len()));
        }
        if !self.additional_nitro_roots.is_empty() {
            parts.push(format!("{} AWS Nitro root(s) besides AWS's (additional_nitro_roots)", self.additional_nitro_roots.len()));
        }
        (!parts.is_empty()).then(|| format!("WARNING: this policy trusts {}: for a TEST chain only", parts.join(" and ")))
    }

    /// Checks claims against the policy and the expected binding.
    pub fn evaluate(&self, claims: &Claims, expected_report_data: &[u8; 64], now_secs: u64) -> Verdict {
        let mut failures = Vec::new();
        if claims.format.is_insecure() && !self.allow_insecure_dev {
            failures.push(PolicyFailure::InsecureDevEvidence);
        }
        let m = claims.measurement.to_ascii_lowercase();
        if !self.allowed_measurements.is_empty() && !self.allowed_measurements.iter().any(|a| a.to_ascii_lowercase() == m) {
            failures.push(PolicyFailure::MeasurementNotAllowed { measurement: claims.measurement.clone() });
        }
        if claims.debug && !self.allow_debug {
            failures.push(PolicyFailure::DebugMode);
        }
        if let Some(at) = claims.issued_at {
            let age = now_secs.saturating_sub(at);
            if age > self.max_age_secs {
                failures.push(PolicyFailure::TooOld { age_secs: age, max_age_secs: self.max_age_secs });
            }
        }
        if let Some(status) = claims.fields.get("TCB_STATUS") {
            if !self.allowed_tcb_status.is_empty() && !self.allowed_tcb_status.iter().any(|a| a == status) {
                failures.push(PolicyFailure::TcbStatusNotAllowed { status: status.clone() });
            }
        }
        for (field, &minimum) in &self.min_svn {
            match numeric_field(claims, field) {
                Some(value) if value < minimum => failures.push(PolicyFailure::SvnTooLow { field: field.clone(), value, minimum }),
                Some(_) => {}
                None => failures.push(PolicyFailure::SvnMissing { field: field.clone() }),
            }
        }
        let bound = hex::decode(&claims.report_data).map(|rd| bool::from(rd.ct_eq(expected_report_data.as_slice()))).unwrap_or(false);
        if !bound {
            failures.push(PolicyFailure::ReportDataMismatch);
        }
        Verdict { accepted: failures.is_empty(), format: Some(claims.format), claims: Some(claims.clone()), failures }
    }

    /// Verifies `evidence` (any known format) with the vendor roots and this policy's
    /// configured roots, without evaluating the claims.
    pub fn verify(&self, evidence: &[u8], endorsements: &[Vec<u8>], now_secs: u64) -> Result<Claims, crate::VerifyError> {
        let snp: Vec<&[u8]> = self.additional_snp_arks.iter().map(|a| a.as_bytes()).collect();
        let nitro: Vec<&[u8]> = self.additional_nitro_roots.iter().map(|a| a.as_bytes()).collect();
        crate::verify_trusting(evidence, endorsements, crate::ConfiguredRoots { snp_arks: &snp, nitro_roots: &nitro }, now_secs)
    }

    /// Verifies `evidence` (any known format) and evaluates it in one step.
    pub fn check(&self, evidence: &[u8], endorsements: &[Vec<u8>], expected_report_data: &[u8; 64], now_secs: u64) -> Verdict {
        if evidence.is_empty() {
            return Verdict { accepted: false, format: None, claims: None, failures: vec![PolicyFailure::MissingEvidence] };
        }
        match self.verify(evidence, endorsements, now_secs) {
            Ok(claims) => self.evaluate(&claims, expected_report_data, now_secs),
            Err(e) => Verdict { accepted: false, format: e.format(), claims: None, failures: vec![PolicyFailure::Unverified { reason: e.to_string() }] },
        }
    }
}

/// A decimal claim field, or one component of an SNP TCB field written as
/// `HEX (boot_loader 3, tee 0, snp 8, microcode 115)` and named `reported_tcb.snp`.
fn numeric_field(claims: &Claims, name: &str) -> Option<u64> {
    if let Some(v) = claims.fields.get(name) {
        return v.trim().parse().ok();
    }
    let (field, component) = name.split_once('.')?;
    let text = claims.fields.get(field)?;
    let inner = text.split_once('(')?.1.trim_end_matches(')');
    inner.split(',').filter_map(|part| part.trim().split_once(' ')).find(|(k, _)| *k == component).and_then(|(_, v)| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::DevAttester;
    use crate::Attester;

    #[test]
    fn default_policy_rejects_dev_evidence_and_names_every_failure() {
        let ev = DevAttester::new([1; 32], [2; 48], true).attest(&[7; 64], 0).unwrap();
        let v = NodePolicy { allowed_measurements: vec!["00".into()], ..NodePolicy::default() }.check(&ev, &[], &[9; 64], 10_000);
        assert!(!v.accepted);
        assert_eq!(v.failures.len(), 5, "{:?}", v.failures);
        assert!(v.failures.contains(&PolicyFailure::InsecureDevEvidence));
        assert!(v.failures.contains(&PolicyFailure::DebugMode));
        assert!(v.failures.contains(&PolicyFailure::ReportDataMismatch));
        assert!(v.failures.iter().any(|f| matches!(f, PolicyFailure::TooOld { .. })));
    }

    #[test]
    fn dev_policy_accepts_bound_fresh_evidence() {
        let ev = DevAttester::new([1; 32], [2; 48], false).attest(&[7; 64], 100).unwrap();
        let v = NodePolicy::insecure_dev().check(&ev, &[], &[7; 64], 150);
        assert!(v.accepted, "{}", v.reasons());
        assert!(!NodePolicy::insecure_dev().check(&[], &[], &[7; 64], 150).accepted);
    }

    #[test]
    fn tcb_status_and_minimum_svns() {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("TCB_STATUS".to_string(), "OutOfDate".to_string());
        fields.insert("QE_ISVSVN".to_string(), "6".to_string());
        fields.insert("reported_tcb".to_string(), "0300000000000873 (boot_loader 3, tee 0, snp 8, microcode 115)".to_string());
        let claims = Claims {
            format: Format::SevSnp,
            measurement: "aa".into(),
            report_data: hex::encode([7u8; 64]),
            debug: false,
            issued_at: None,
            tcb: None,
            signer: None,
            fields,
        };
        let policy = NodePolicy::from_toml(
            "allowed_tcb_status = [\"UpToDate\"]\n[min_svn]\nQE_ISVSVN = 6\n\"reported_tcb.snp\" = 9\n\"reported_tcb.microcode\" = 100\nISVSVN = 1\n",
        )
        .unwrap();
        let v = policy.evaluate(&claims, &[7; 64], 0);
        assert_eq!(
            v.failures,
            vec![
                PolicyFailure::TcbStatusNotAllowed { status: "OutOfDate".into() },
                PolicyFailure::SvnMissing { field: "ISVSVN".into() },
                PolicyFailure::SvnTooLow { field: "reported_tcb.snp".into(), value: 8, minimum: 9 },
            ]
        );
    }

    #[test]
    fn policy_parses_from_toml_and_refuses_unknown_keys() {
        let p = NodePolicy::from_toml("allow_insecure_dev = true\nallowed_measurements = [\"ab\"]\n").unwrap();
        assert!(p.allow_insecure_dev && p.max_age_secs == 3600);
        assert!(NodePolicy::from_toml("allow_everything = true").is_err());
    }
}
