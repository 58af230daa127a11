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
    /// Rules for Intel TDX evidence (`[tdx]`). Once any per-format section is present,
    /// evidence of a format without one is refused: the sections scope the policy.
    pub tdx: Option<TdxRules>,
    /// Rules for AMD SEV-SNP evidence (`[snp]`). Its VMPL and guest-policy defaults apply
    /// to SNP evidence even when the section is absent.
    pub snp: Option<SnpRules>,
    /// Rules for Intel SGX (DCAP) evidence (`[sgx]`).
    pub sgx: Option<SgxRules>,
    /// Rules for AWS Nitro Enclaves evidence (`[nitro]`).
    pub nitro: Option<NitroRules>,
}

/// Intel TDX. MRTD measures only the TD's initial memory, i.e. the TDVF firmware; the
/// firmware extends the TD's configuration (ACPI tables, boot variables) into RTMR0, the
/// kernel (with the boot loader) into RTMR1 and the command line and initrd into RTMR2;
/// RTMR3 is left to the running guest. A policy that names code must pin RTMR0–2 as
/// well as MRTD: otherwise any TD booted with the same public firmware passes, whatever
/// kernel it runs. Each list holds the accepted values (hex, any case); empty means any.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TdxRules {
    pub mrtd: Vec<String>,
    pub rtmr0: Vec<String>,
    pub rtmr1: Vec<String>,
    pub rtmr2: Vec<String>,
    pub rtmr3: Vec<String>,
    /// Set by the host at launch (e.g. a digest of the TD's intended configuration).
    pub mrconfigid: Vec<String>,
    pub mrowner: Vec<String>,
    pub mrownerconfig: Vec<String>,
}

/// AMD SEV-SNP. MEASUREMENT covers the guest's initial memory: the firmware and, with
/// measured direct boot, the hashes of kernel, initrd and command line. The report is
/// requested at some VMPL; code running at VMPL > 0 (beside an SVSM or a paravisor) is
/// outside the measured image yet can obtain reports over report data of its choosing,
/// so by default only VMPL 0 reports pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnpRules {
    /// Accepted MEASUREMENTs (hex); empty: any (or `allowed_measurements`).
    pub measurement: Vec<String>,
    /// Accepted HOST_DATA values (hex); empty: any.
    pub host_data: Vec<String>,
    /// Accepted ID_KEY_DIGESTs (hex): the key that signed the guest's ID block.
    pub id_key_digest: Vec<String>,
    /// The highest VMPL a report may come from. 0 (the default) admits only the most
    /// privileged level, the one the measured image runs at.
    pub max_vmpl: u32,
    /// Accept guests whose policy lets a migration agent in (MIGRATE_MA, bit 18): the
    /// agent can read and export the guest's memory. Off by default.
    pub allow_migrate_ma: bool,
    /// Accept guests whose policy allows SMT (bit 16). On by default.
    pub allow_smt: bool,
    /// Guest-policy bits that must be set, as a mask (e.g. SINGLE_SOCKET `0x100000`).
    pub required_policy_bits: u64,
    /// Guest-policy bits that must be clear, as a mask (e.g. CXL_ALLOW `0x200000`).
    pub forbidden_policy_bits: u64,
    /// Require an AMD CRL among the endorsements (the KDS's, signed by the ARK): with it
    /// a revoked ASK is refused. Off by default (the CRL must be fetched and kept fresh).
    pub require_crl: bool,
}

impl Default for SnpRules {
    fn default() -> Self {
        SnpRules {
            measurement: Vec::new(),
            host_data: Vec::new(),
            id_key_digest: Vec::new(),
            max_vmpl: 0,
            allow_migrate_ma: false,
            allow_smt: true,
            required_policy_bits: 0,
            forbidden_policy_bits: 0,
            require_crl: false,
        }
    }
}

/// Intel SGX. MRENCLAVE pins one enclave build; MRSIGNER with ISVPRODID pins every build
/// its signer releases for that product (with `min_svn.ISVSVN` to refuse old ones).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SgxRules {
    pub mrenclave: Vec<String>,
    pub mrsigner: Vec<String>,
    pub isvprodid: Vec<u16>,
}

/// AWS Nitro Enclaves. PCR0 is the SHA-384 of the whole enclave image file, so it pins
/// the code alone; PCR1 (kernel and boot ramdisk) and PCR2 (the application) pin parts
/// of it, PCR3 the parent's IAM role, PCR4 the parent instance, PCR8 the certificate
/// that signed the image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NitroRules {
    pub pcr0: Vec<String>,
    pub pcr1: Vec<String>,
    pub pcr2: Vec<String>,
    pub pcr3: Vec<String>,
    pub pcr4: Vec<String>,
    pub pcr8: Vec<String>,
}

/// The claim fields a section pins, by claim name, and which of them is the format's
/// launch measurement.
fn pinned_fields(policy: &NodePolicy, format: Format) -> Option<Vec<(&'static str, Vec<String>)>> {
    let lists = match format {
        Format::Tdx => {
            let r = policy.tdx.as_ref()?;
            vec![
                ("MRTD", r.mrtd.clone()),
                ("RTMR0", r.rtmr0.clone()),
                ("RTMR1", r.rtmr1.clone()),
                ("RTMR2", r.rtmr2.clone()),
                ("RTMR3", r.rtmr3.clone()),
                ("MRCONFIGID", r.mrconfigid.clone()),
                ("MROWNER", r.mrowner.clone()),
                ("MROWNERCONFIG", r.mrownerconfig.clone()),
            ]
        }
        Format::SevSnp => {
            let r = policy.snp.as_ref()?;
            vec![("measurement", r.measurement.clone()), ("host_data", r.host_data.clone()), ("id_key_digest", r.id_key_digest.clone())]
        }
        Format::SgxDcap => {
            let r = policy.sgx.as_ref()?;
            vec![("MRENCLAVE", r.mrenclave.clone()), ("MRSIGNER", r.mrsigner.clone()), ("ISVPRODID", r.isvprodid.iter().map(u16::to_string).collect())]
        }
        Format::AwsNitro => {
            let r = policy.nitro.as_ref()?;
            vec![
                ("PCR0", r.pcr0.clone()),
                ("PCR1", r.pcr1.clone()),
                ("PCR2", r.pcr2.clone()),
                ("PCR3", r.pcr3.clone()),
                ("PCR4", r.pcr4.clone()),
                ("PCR8", r.pcr8.clone()),
            ]
        }
        Format::DevInsecure => return None,
    };
    Some(lists)
}

/// Whether a format's section pins its code by itself.
fn section_pins_code(policy: &NodePolicy, format: Format) -> bool {
    match format {
        Format::Tdx => policy.tdx.as_ref().is_some_and(|r| !r.mrtd.is_empty()),
        Format::SevSnp => policy.snp.as_ref().is_some_and(|r| !r.measurement.is_empty()),
        Format::SgxDcap => policy.sgx.as_ref().is_some_and(|r| !r.mrenclave.is_empty() || (!r.mrsigner.is_empty() && !r.isvprodid.is_empty())),
        Format::AwsNitro => policy.nitro.as_ref().is_some_and(|r| !r.pcr0.is_empty()),
        Format::DevInsecure => false,
    }
}

const SNP_POLICY_SMT: u64 = 1 << 16;
const SNP_POLICY_MIGRATE_MA: u64 = 1 << 18;

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
            tdx: None,
            snp: None,
            sgx: None,
            nitro: None,
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
    #[error("{field} {value} is not among the values the policy allows")]
    FieldNotAllowed { field: String, value: String },
    #[error("the evidence states no {field}, which the policy pins")]
    FieldMissing { field: String },
    #[error("{format} evidence is not allowed: the policy has rules for other formats only")]
    FormatNotAllowed { format: String },
    #[error("the policy pins code for other formats but not for {format} evidence: list its measurement in allowed_measurements or its own section")]
    CodeNotPinned { format: String },
    #[error("the policy pins MRTD, which covers only the TD firmware, but not {missing}: the kernel, initrd and command line are measured there, so any TD on the same firmware would pass; pin them in [tdx]")]
    TdxRuntimeUnpinned { missing: String },
    #[error("the report comes from VMPL {vmpl}; the policy allows at most VMPL {max_vmpl} (code at a higher VMPL is outside the measured image)")]
    VmplTooHigh { vmpl: u64, max_vmpl: u32 },
    #[error("the policy requires an AMD CRL (snp.require_crl) and none came with the evidence")]
    SnpCrlMissing,
    #[error("the SEV-SNP guest policy {policy:#x} is refused: {why}")]
    SnpGuestPolicy { policy: u64, why: String },
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
        if self.allow_insecure_dev || self.pins_code() {
            return Ok(());
        }
        Err(format!(
            "the policy for {whom} accepts any measurement: outside dev mode it must list the allowed_measurements of the code you trust (or pin it in a per-format section such as [tdx] or [snp]; pass a policy file), or any vendor-signed guest would pass whatever code it runs"
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
        self.evaluate_format_rules(claims, &mut failures);
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

    /// Whether any per-format section is present.
    fn has_format_sections(&self) -> bool {
        self.tdx.is_some() || self.snp.is_some() || self.sgx.is_some() || self.nitro.is_some()
    }

    /// Whether the policy names the code it accepts, for some format.
    pub fn pins_code(&self) -> bool {
        !self.allowed_measurements.is_empty()
            || [Format::Tdx, Format::SevSnp, Format::SgxDcap, Format::AwsNitro].into_iter().any(|f| section_pins_code(self, f))
    }

    /// The per-format rules: scoping, pinned fields, TDX runtime measurements, SNP VMPL
    /// and guest policy.
    fn evaluate_format_rules(&self, claims: &Claims, failures: &mut Vec<PolicyFailure>) {
        let format = claims.format;
        if format.is_insecure() {
            return;
        }
        let section = pinned_fields(self, format);
        if section.is_none() && self.has_format_sections() {
            failures.push(PolicyFailure::FormatNotAllowed { format: format.to_string() });
        }
        let code_pinned_here = !self.allowed_measurements.is_empty() || section_pins_code(self, format);
        if self.pins_code() && !code_pinned_here && section.is_some() {
            failures.push(PolicyFailure::CodeNotPinned { format: format.to_string() });
        }
        for (field, allowed) in section.iter().flatten() {
            if allowed.is_empty() {
                continue;
            }
            let value = if *field == "measurement" { Some(&claims.measurement) } else { claims.fields.get(*field) };
            match value {
                None => failures.push(PolicyFailure::FieldMissing { field: (*field).to_string() }),
                Some(v) if !allowed.iter().any(|a| a.eq_ignore_ascii_case(v)) => {
                    failures.push(PolicyFailure::FieldNotAllowed { field: (*field).to_string(), value: v.clone() })
                }
                Some(_) => {}
            }
        }
        match format {
            Format::Tdx if code_pinned_here => {
                let rules = self.tdx.clone().unwrap_or_default();
                let missing: Vec<&str> = [("RTMR0", &rules.rtmr0), ("RTMR1", &rules.rtmr1), ("RTMR2", &rules.rtmr2)]
                    .into_iter()
                    .filter(|(_, list)| list.is_empty())
                    .map(|(name, _)| name)
                    .collect();
                if !missing.is_empty() {
                    failures.push(PolicyFailure::TdxRuntimeUnpinned { missing: missing.join(", ") });
                }
            }
            Format::SevSnp => self.evaluate_snp(claims, failures),
            _ => {}
        }
    }

    fn evaluate_snp(&self, claims: &Claims, failures: &mut Vec<PolicyFailure>) {
        let rules = self.snp.clone().unwrap_or_default();
        match claims.fields.get("vmpl").and_then(|v| v.trim().parse::<u64>().ok()) {
            Some(vmpl) if vmpl > u64::from(rules.max_vmpl) => failures.push(PolicyFailure::VmplTooHigh { vmpl, max_vmpl: rules.max_vmpl }),
            Some(_) => {}
            None => failures.push(PolicyFailure::FieldMissing { field: "vmpl".into() }),
        }
        if rules.require_crl && !claims.fields.contains_key("crl") {
            failures.push(PolicyFailure::SnpCrlMissing);
        }
        let Some(policy) = claims.fields.get("policy").and_then(|v| u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok()) else {
            failures.push(PolicyFailure::FieldMissing { field: "policy".into() });
            return;
        };
        let mut refuse = |why: String| failures.push(PolicyFailure::SnpGuestPolicy { policy, why });
        if policy & SNP_POLICY_MIGRATE_MA != 0 && !rules.allow_migrate_ma {
            refuse("MIGRATE_MA (bit 18) lets a migration agent read the guest's memory; set snp.allow_migrate_ma to accept it".into());
        }
        if policy & SNP_POLICY_SMT != 0 && !rules.allow_smt {
            refuse("SMT (bit 16) is allowed, and snp.allow_smt is false".into());
        }
        let absent = rules.required_policy_bits & !policy;
        if absent != 0 {
            refuse(format!("bits {absent:#x} of snp.required_policy_bits are clear"));
        }
        let present = rules.forbidden_policy_bits & policy;
        if present != 0 {
            refuse(format!("bits {present:#x} of snp.forbidden_policy_bits are set"));
        }
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
        fields.insert("vmpl".to_string(), "0".to_string());
        fields.insert("policy".to_string(), "0x30000".to_string());
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
