//! AMD SEV-SNP attestation. The ATTESTATION_REPORT is parsed from the fixed offsets of the
//! SEV-SNP Firmware ABI specification (AMD publication 56860, table "ATTESTATION_REPORT
//! Structure"), then verified against the VCEK (or VLEK) certificate, the ASK and an AMD root
//! key (ARK) pinned in this crate, with the certificate extensions of AMD publication 57230.
//!
//! Parse ([`AttestationReport::parse`]), then verify ([`SnpVerifier`], [`verify_with_roots`]):
//! the ARK is one of the pinned roots; ARK → ASK → VCEK are RSASSA-PSS SHA-384 signatures and
//! every certificate is valid at the caller's time; the report's ECDSA P-384 SHA-384
//! signature over bytes `[0, 0x2A0)` verifies with the VCEK key; the VCEK's TCB extensions
//! equal the report's REPORTED_TCB and its hardware ID equals CHIP_ID. Policy comes after.
//!
//! Azure confidential VMs give the guest an *HCL report* instead of a bare one: a 32-byte
//! header, the SNP report, then runtime data (JSON holding the vTPM keys and the guest's
//! `user-data`) whose hash the HCL put in REPORT_DATA. It is accepted too: the embedded report
//! is verified as above and the runtime data must hash to REPORT_DATA. The claims'
//! `report_data` stays the hardware REPORT_DATA; the guest's own bytes are in the field
//! `azure_hcl.user_data`, which is what a binding check must compare on Azure.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use ring::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED, RSA_PSS_2048_8192_SHA384};
use sha2::Digest;
use x509_parser::asn1_rs::Any;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSASSAPSS};
use x509_parser::prelude::FromDer;

use crate::{Claims, Format, Verifier, VerifyError};

/// Length of an ATTESTATION_REPORT (0x4A0).
pub const REPORT_LEN: usize = 0x4A0;
/// The signature covers bytes `[0, SIGNED_LEN)`.
pub const SIGNED_LEN: usize = 0x2A0;
/// Report versions whose layout this parser knows. Versions 4 and 5 only fill bytes that were
/// reserved in version 3 (the mitigation vectors of v5 are not decoded).
pub const SUPPORTED_VERSIONS: RangeInclusive<u32> = 2..=5;
/// SIGNATURE_ALGO value for ECDSA P-384 with SHA-384, the only one the ABI defines.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;
/// POLICY bit 19: the guest may be debugged by the hypervisor.
pub const POLICY_DEBUG_BIT: u32 = 19;
/// CPUID family of Turin (Zen 5), whose TCB_VERSION layout differs from Milan's and Genoa's.
pub const CPUID_FAMILY_TURIN: u8 = 0x1A;

/// The AMD root keys this crate trusts, by product, as shipped by AMD's key distribution
/// service (see `attestation/roots/amd/PROVENANCE.md`).
pub const PINNED_ARKS: [(&str, &[u8]); 3] = [
    ("Milan", include_bytes!("../roots/amd/ark_milan.pem")),
    ("Genoa", include_bytes!("../roots/amd/ark_genoa.pem")),
    ("Turin", include_bytes!("../roots/amd/ark_turin.pem")),
];

const F: Format = Format::SevSnp;

fn malformed(why: impl Into<String>) -> VerifyError {
    VerifyError::Malformed { format: F, why: why.into() }
}

fn chain_error(why: impl Into<String>) -> VerifyError {
    VerifyError::CertificateChain { format: F, why: why.into() }
}

// Fixed-offset readers. Callers check the length first, so these never fail on a report, but
// they return errors rather than index so that no input can make the parser panic.
fn bytes_at<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], VerifyError> {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or_else(|| malformed(format!("{N}-byte field at {off:#x} lies outside the {} bytes given", b.len())))
}

fn u8_at(b: &[u8], off: usize) -> Result<u8, VerifyError> {
    bytes_at::<1>(b, off).map(|[x]| x)
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, VerifyError> {
    bytes_at::<4>(b, off).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, VerifyError> {
    bytes_at::<8>(b, off).map(u64::from_le_bytes)
}

/// A TCB_VERSION: the security version numbers of the firmware components. Milan and Genoa
/// lay it out as `[boot_loader, tee, 0, 0, 0, 0, snp, microcode]`, Turin as
/// `[fmc, boot_loader, tee, snp, 0, 0, 0, microcode]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcbVersion {
    pub raw: [u8; 8],
    /// Firmware mask ROM SVN (Turin and later only).
    pub fmc: Option<u8>,
    pub boot_loader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl TcbVersion {
    pub fn decode(raw: [u8; 8], turin_layout: bool) -> Self {
        let [b0, b1, b2, b3, _, _, b6, b7] = raw;
        if turin_layout {
            TcbVersion { raw, fmc: Some(b0), boot_loader: b1, tee: b2, snp: b3, microcode: b7 }
        } else {
            TcbVersion { raw, fmc: None, boot_loader: b0, tee: b1, snp: b6, microcode: b7 }
        }
    }
}

impl std::fmt::Display for TcbVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (", hex::encode(self.raw))?;
        if let Some(fmc) = self.fmc {
            write!(f, "fmc {fmc}, ")?;
        }
        write!(f, "boot_loader {}, tee {}, snp {}, microcode {})", self.boot_loader, self.tee, self.snp, self.microcode)
    }
}

/// Which key signed the report (bits 4:2 of the key-information word at 0x48).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigningKey {
    /// Versioned Chip Endorsement Key: unique to the chip and its TCB.
    Vcek,
    /// Versioned Loaded Endorsement Key: provisioned by a cloud provider through AMD.
    Vlek,
    /// The report is unsigned.
    None,
    Reserved(u8),
}

impl SigningKey {
    fn from_bits(bits: u8) -> Self {
        match bits {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            other => SigningKey::Reserved(other),
        }
    }
}

impl std::fmt::Display for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SigningKey::Vcek => f.write_str("vcek"),
            SigningKey::Vlek => f.write_str("vlek"),
            SigningKey::None => f.write_str("none"),
            SigningKey::Reserved(b) => write!(f, "reserved ({b})"),
        }
    }
}

/// A SEV-SNP ATTESTATION_REPORT, every field at its offset in the ABI specification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationReport {
    /// 0x000
    pub version: u32,
    /// 0x004
    pub guest_svn: u32,
    /// 0x008: the guest policy; bit 19 allows debugging.
    pub policy: u64,
    /// 0x010
    pub family_id: [u8; 16],
    /// 0x020
    pub image_id: [u8; 16],
    /// 0x030
    pub vmpl: u32,
    /// 0x034
    pub signature_algo: u32,
    /// 0x038
    pub current_tcb: TcbVersion,
    /// 0x040
    pub platform_info: u64,
    /// 0x048 bit 0
    pub author_key_en: bool,
    /// 0x048 bit 1: CHIP_ID is zeroed.
    pub mask_chip_key: bool,
    /// 0x048 bits 4:2
    pub signing_key: SigningKey,
    /// 0x050
    pub report_data: [u8; 64],
    /// 0x090
    pub measurement: [u8; 48],
    /// 0x0C0
    pub host_data: [u8; 32],
    /// 0x0E0
    pub id_key_digest: [u8; 48],
    /// 0x110
    pub author_key_digest: [u8; 48],
    /// 0x140
    pub report_id: [u8; 32],
    /// 0x160
    pub report_id_ma: [u8; 32],
    /// 0x180
    pub reported_tcb: TcbVersion,
    /// 0x188, 0x189, 0x18A: CPUID family, model and stepping (version 3 and later).
    pub cpuid_fam_id: Option<u8>,
    pub cpuid_mod_id: Option<u8>,
    pub cpuid_step: Option<u8>,
    /// 0x1A0
    pub chip_id: [u8; 64],
    /// 0x1E0
    pub committed_tcb: TcbVersion,
    /// 0x1E8, 0x1E9, 0x1EA
    pub current_build: u8,
    pub current_minor: u8,
    pub current_major: u8,
    /// 0x1EC, 0x1ED, 0x1EE
    pub committed_build: u8,
    pub committed_minor: u8,
    pub committed_major: u8,
    /// 0x1F0
    pub launch_tcb: TcbVersion,
    /// 0x2A0: R, little-endian, zero-padded to 72 bytes.
    pub signature_r: [u8; 72],
    /// 0x2E8: S, little-endian, zero-padded to 72 bytes.
    pub signature_s: [u8; 72],
    signed: Vec<u8>,
}

impl AttestationReport {
    /// Parses exactly [`REPORT_LEN`] bytes. Checks only the layout, nothing cryptographic.
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        if bytes.len() != REPORT_LEN {
            return Err(malformed(format!("an ATTESTATION_REPORT is {REPORT_LEN} bytes, got {}", bytes.len())));
        }
        let version = u32_at(bytes, 0x000)?;
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(malformed(format!("report version {version} is not supported ({SUPPORTED_VERSIONS:?})")));
        }
        let (cpuid_fam_id, cpuid_mod_id, cpuid_step) =
            if version >= 3 { (Some(u8_at(bytes, 0x188)?), Some(u8_at(bytes, 0x189)?), Some(u8_at(bytes, 0x18A)?)) } else { (None, None, None) };
        // Version 2 reports predate Turin, so only a v3+ CPUID can select the Turin layout.
        let turin = cpuid_fam_id == Some(CPUID_FAMILY_TURIN);
        let tcb = |off| bytes_at::<8>(bytes, off).map(|raw| TcbVersion::decode(raw, turin));
        let key_info = u32_at(bytes, 0x048)?;
        Ok(AttestationReport {
            version,
            guest_svn: u32_at(bytes, 0x004)?,
            policy: u64_at(bytes, 0x008)?,
            family_id: bytes_at(bytes, 0x010)?,
            image_id: bytes_at(bytes, 0x020)?,
            vmpl: u32_at(bytes, 0x030)?,
            signature_algo: u32_at(bytes, 0x034)?,
            current_tcb: tcb(0x038)?,
            platform_info: u64_at(bytes, 0x040)?,
            author_key_en: key_info & 1 != 0,
            mask_chip_key: key_info & 2 != 0,
            signing_key: SigningKey::from_bits(((key_info >> 2) & 0b111) as u8),
            report_data: bytes_at(bytes, 0x050)?,
            measurement: bytes_at(bytes, 0x090)?,
            host_data: bytes_at(bytes, 0x0C0)?,
            id_key_digest: bytes_at(bytes, 0x0E0)?,
            author_key_digest: bytes_at(bytes, 0x110)?,
            report_id: bytes_at(bytes, 0x140)?,
            report_id_ma: bytes_at(bytes, 0x160)?,
            reported_tcb: tcb(0x180)?,
            cpuid_fam_id,
            cpuid_mod_id,
            cpuid_step,
            chip_id: bytes_at(bytes, 0x1A0)?,
            committed_tcb: tcb(0x1E0)?,
            current_build: u8_at(bytes, 0x1E8)?,
            current_minor: u8_at(bytes, 0x1E9)?,
            current_major: u8_at(bytes, 0x1EA)?,
            committed_build: u8_at(bytes, 0x1EC)?,
            committed_minor: u8_at(bytes, 0x1ED)?,
            committed_major: u8_at(bytes, 0x1EE)?,
            launch_tcb: tcb(0x1F0)?,
            signature_r: bytes_at(bytes, 0x2A0)?,
            signature_s: bytes_at(bytes, 0x2E8)?,
            signed: bytes.get(..SIGNED_LEN).map(<[u8]>::to_vec).ok_or_else(|| malformed("report shorter than its signed part"))?,
        })
    }

    /// The bytes the signature covers, `[0, 0x2A0)`.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed
    }

    /// POLICY bit 19.
    pub fn debug_allowed(&self) -> bool {
        self.policy & (1 << POLICY_DEBUG_BIT) != 0
    }

    /// The signature as ring's fixed-width P-384 encoding: R and S, 48 bytes each, big-endian.
    /// `None` when either has bits above 384, which no valid signature has.
    pub fn signature_p1363(&self) -> Option<[u8; 96]> {
        let mut out = [0u8; 96];
        let (r, s) = out.split_at_mut(48);
        le72_to_be48(&self.signature_r, r)?;
        le72_to_be48(&self.signature_s, s)?;
        Some(out)
    }

    /// Every decoded field but measurement and report_data (which have their own claims), by
    /// its specification name.
    pub fn fields(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("version", self.version.to_string());
        put("guest_svn", self.guest_svn.to_string());
        put("policy", format!("{:#x}", self.policy));
        put("family_id", hex::encode(self.family_id));
        put("image_id", hex::encode(self.image_id));
        put("vmpl", self.vmpl.to_string());
        put("signature_algo", self.signature_algo.to_string());
        put("current_tcb", self.current_tcb.to_string());
        put("platform_info", format!("{:#x}", self.platform_info));
        put("author_key_en", self.author_key_en.to_string());
        put("mask_chip_key", self.mask_chip_key.to_string());
        put("signing_key", self.signing_key.to_string());
        put("host_data", hex::encode(self.host_data));
        put("id_key_digest", hex::encode(self.id_key_digest));
        put("author_key_digest", hex::encode(self.author_key_digest));
        put("report_id", hex::encode(self.report_id));
        put("report_id_ma", hex::encode(self.report_id_ma));
        put("reported_tcb", self.reported_tcb.to_string());
        if let (Some(fam), Some(model), Some(step)) = (self.cpuid_fam_id, self.cpuid_mod_id, self.cpuid_step) {
            put("cpuid_fam_id", format!("{fam:#04x}"));
            put("cpuid_mod_id", format!("{model:#04x}"));
            put("cpuid_step", format!("{step:#04x}"));
        }
        put("chip_id", hex::encode(self.chip_id));
        put("committed_tcb", self.committed_tcb.to_string());
        put("current_build", self.current_build.to_string());
        put("current_minor", self.current_minor.to_string());
        put("current_major", self.current_major.to_string());
        put("committed_build", self.committed_build.to_string());
        put("committed_minor", self.committed_minor.to_string());
        put("committed_major", self.committed_major.to_string());
        put("launch_tcb", self.launch_tcb.to_string());
        m
    }
}

fn le72_to_be48(le: &[u8; 72], out: &mut [u8]) -> Option<()> {
    let (low, high) = le.split_at(48);
    if high.iter().any(|&b| b != 0) || out.len() != 48 {
        return None;
    }
    for (d, s) in out.iter_mut().zip(low.iter().rev()) {
        *d = *s;
    }
    Some(())
}

/// Magic at the start of an Azure HCL report.
pub const HCL_MAGIC: &[u8; 4] = b"HCLA";
const HCL_HEADER_LEN: usize = 0x20;
/// The runtime-data header that follows the SNP report: data_size, version, report_type,
/// hash_type, runtime_data_size (five little-endian u32).
const HCL_RUNTIME_OFFSET: usize = HCL_HEADER_LEN + REPORT_LEN;
const HCL_RUNTIME_HEADER_LEN: usize = 20;
const HCL_REPORT_TYPE_SNP: u32 = 2;

/// An Azure HCL report: the SNP report plus the runtime data whose hash is its REPORT_DATA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureHclReport {
    pub report: AttestationReport,
    /// 1 = SHA-256, 2 = SHA-384, 3 = SHA-512.
    pub hash_type: u32,
    pub runtime_data: Vec<u8>,
}

impl AzureHclReport {
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        if !bytes.starts_with(HCL_MAGIC) {
            return Err(malformed("not an Azure HCL report (no HCLA magic)"));
        }
        let embedded = bytes
            .get(HCL_HEADER_LEN..HCL_RUNTIME_OFFSET)
            .ok_or_else(|| malformed(format!("HCL report of {} bytes cannot hold the {REPORT_LEN}-byte SNP report", bytes.len())))?;
        let report = AttestationReport::parse(embedded)?;
        let report_type = u32_at(bytes, HCL_RUNTIME_OFFSET + 8)?;
        if report_type != HCL_REPORT_TYPE_SNP {
            return Err(malformed(format!("HCL report type {report_type} is not SEV-SNP ({HCL_REPORT_TYPE_SNP})")));
        }
        let hash_type = u32_at(bytes, HCL_RUNTIME_OFFSET + 12)?;
        let size = u32_at(bytes, HCL_RUNTIME_OFFSET + 16)?;
        let start = HCL_RUNTIME_OFFSET + HCL_RUNTIME_HEADER_LEN;
        let runtime_data = usize::try_from(size)
            .ok()
            .and_then(|n| start.checked_add(n))
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| malformed(format!("HCL runtime data of {size} bytes runs past the {} bytes given", bytes.len())))?
            .to_vec();
        Ok(AzureHclReport { report, hash_type, runtime_data })
    }

    /// The runtime data's digest under `hash_type`, which REPORT_DATA must begin with.
    pub fn runtime_data_digest(&self) -> Result<Vec<u8>, VerifyError> {
        Ok(match self.hash_type {
            1 => sha2::Sha256::digest(&self.runtime_data).to_vec(),
            2 => sha2::Sha384::digest(&self.runtime_data).to_vec(),
            3 => sha2::Sha512::digest(&self.runtime_data).to_vec(),
            other => return Err(malformed(format!("HCL runtime data hash type {other} is unknown"))),
        })
    }

    /// The `user-data` string of the runtime data's JSON, if it is JSON and has one.
    pub fn user_data(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.runtime_data).ok()?;
        v.get("user-data")?.as_str().map(str::to_string)
    }
}

/// Evidence this module accepts: a bare report or an Azure HCL report around one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnpEvidence {
    Report(AttestationReport),
    AzureHcl(AzureHclReport),
}

impl SnpEvidence {
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        if bytes.starts_with(HCL_MAGIC) {
            AzureHclReport::parse(bytes).map(SnpEvidence::AzureHcl)
        } else {
            AttestationReport::parse(bytes).map(SnpEvidence::Report)
        }
    }

    pub fn report(&self) -> &AttestationReport {
        match self {
            SnpEvidence::Report(r) => r,
            SnpEvidence::AzureHcl(h) => &h.report,
        }
    }
}

/// Verifies SEV-SNP evidence against the AMD roots in [`PINNED_ARKS`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SnpVerifier;

impl Verifier for SnpVerifier {
    fn format(&self) -> Format {
        F
    }

    fn detect(&self, evidence: &[u8]) -> bool {
        if evidence.starts_with(HCL_MAGIC) {
            // Leave HCL reports around other hardware (TDX) to their own verifier.
            return u32_at(evidence, HCL_RUNTIME_OFFSET + 8).map_or(true, |t| t == HCL_REPORT_TYPE_SNP);
        }
        evidence.len() == REPORT_LEN && u32_at(evidence, 0).is_ok_and(|v| SUPPORTED_VERSIONS.contains(&v))
    }

    fn verify(&self, evidence: &[u8], endorsements: &[Vec<u8>], now_secs: u64) -> Result<Claims, VerifyError> {
        let roots: Vec<&[u8]> = PINNED_ARKS.iter().map(|(_, pem)| *pem).collect();
        verify_with_roots(evidence, endorsements, &roots, now_secs)
    }
}

/// Verifies SEV-SNP evidence with the given trust anchors (ARK certificates, PEM or DER)
/// instead of the pinned ones. `endorsements` holds the VCEK or VLEK certificate and the ASK
/// (or ASVK), and optionally the ARK, in any order, each item DER or PEM (one or more
/// certificates). The ARK may be left out because it is pinned; if present, it must be one of
/// `trusted_arks`.
pub fn verify_with_roots(evidence: &[u8], endorsements: &[Vec<u8>], trusted_arks: &[&[u8]], now_secs: u64) -> Result<Claims, VerifyError> {
    let evidence = SnpEvidence::parse(evidence)?;
    let report = evidence.report();
    if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384 {
        return Err(malformed(format!("SIGNATURE_ALGO {} is not ECDSA P-384 with SHA-384", report.signature_algo)));
    }
    match report.signing_key {
        SigningKey::Vcek | SigningKey::Vlek => {}
        SigningKey::None => return Err(VerifyError::BadSignature { format: F, what: "the report (SIGNING_KEY says it is unsigned)".into() }),
        SigningKey::Reserved(b) => return Err(malformed(format!("SIGNING_KEY {b} is reserved"))),
    }

    let (certificates, crls) = split_crls(endorsements);
    let supplied = decode_certificates(&certificates, |i, why| malformed(format!("endorsement {i}: {why}")))?;
    let anchors = decode_certificates(&trusted_arks.iter().map(|a| a.to_vec()).collect::<Vec<_>>(), |i, why| chain_error(format!("trust anchor {i}: {why}")))?;
    let supplied = parse_all(&supplied, |i, why| malformed(format!("endorsement certificate {i}: {why}")))?;
    let anchors = parse_all(&anchors, |i, why| chain_error(format!("trust anchor {i}: {why}")))?;

    let chain = cached_chain(&supplied, &anchors)?;
    for (cert, what) in [(chain.ark, "the ARK certificate"), (chain.ask, "the ASK certificate"), (chain.leaf, leaf_name(report))] {
        check_validity(cert, what, now_secs)?;
    }

    let signature = report.signature_p1363().ok_or_else(|| VerifyError::BadSignature { format: F, what: "the report (R or S exceeds 384 bits)".into() })?;
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &chain.leaf.public_key().subject_public_key.data)
        .verify(report.signed_bytes(), &signature)
        .map_err(|_| VerifyError::BadSignature { format: F, what: format!("the report (with the key of {})", leaf_name(report)) })?;

    check_tcb_extensions(report, chain.leaf)?;
    let crl_checked = check_crls(&crls, &chain, now_secs)?;

    let mut fields = report.fields();
    fields.insert("root".into(), common_name(chain.ark));
    fields.insert("intermediate".into(), common_name(chain.ask));
    fields.insert("REPORT_DATA".into(), hex::encode(report.report_data));
    if let Some(text) = crl_checked {
        fields.insert("crl".into(), text);
    }
    // What the guest bound: REPORT_DATA itself, or under Azure's paravisor (HCL) the
    // runtime data's `user-data`, which REPORT_DATA binds through its hash. Without
    // user-data an Azure report binds nothing the guest chose, and the binding check fails.
    let mut bound = hex::encode(report.report_data);
    if let SnpEvidence::AzureHcl(hcl) = &evidence {
        let digest = hcl.runtime_data_digest()?;
        if report.report_data.get(..digest.len()) != Some(digest.as_slice()) {
            return Err(VerifyError::BadSignature { format: F, what: "the Azure HCL runtime data (its hash is not the signed REPORT_DATA)".into() });
        }
        fields.insert("azure_hcl.runtime_data_hash".into(), hex::encode(&digest));
        fields.insert("azure_hcl.hash_type".into(), hcl.hash_type.to_string());
        bound = String::new();
        if let Some(user_data) = hcl.user_data() {
            if user_data.len() == 128 && hex::decode(&user_data).is_ok() {
                bound = user_data.to_ascii_lowercase();
            }
            fields.insert("azure_hcl.user_data".into(), user_data);
        }
    }

    Ok(Claims {
        format: F,
        measurement: hex::encode(report.measurement),
        report_data: bound,
        debug: report.debug_allowed(),
        issued_at: None,
        tcb: Some(report.reported_tcb.to_string()),
        signer: Some(chain.leaf.subject().to_string()),
        fields,
    })
}

fn leaf_name(report: &AttestationReport) -> &'static str {
    match report.signing_key {
        SigningKey::Vlek => "the VLEK certificate",
        _ => "the VCEK certificate",
    }
}

/// Takes the CRLs (DER, or PEM `X509 CRL`) out of the endorsements; the rest are certificates.
fn split_crls(items: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    use x509_parser::prelude::FromDer;
    let mut certificates = Vec::new();
    let mut crls = Vec::new();
    for item in items {
        if item.first() == Some(&0x30) {
            if X509Certificate::from_der(item).is_err() && x509_parser::revocation_list::CertificateRevocationList::from_der(item).is_ok() {
                crls.push(item.clone());
            } else {
                certificates.push(item.clone());
            }
            continue;
        }
        let pems: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(item).filter_map(Result::ok).collect();
        if !pems.is_empty() && pems.iter().all(|p| p.label == "X509 CRL") {
            crls.extend(pems.into_iter().map(|p| p.contents));
        } else {
            certificates.push(item.clone());
        }
    }
    (certificates, crls)
}

/// Checks AMD's CRLs (as the KDS serves them: issued and signed by the ARK, listing
/// revoked ASKs): each must be the ARK's, signed by it with RSA-PSS, and current at
/// `now_secs`; the chain's ASK must not be listed. Returns what was checked, if any CRL
/// was given.
fn check_crls(crls: &[Vec<u8>], chain: &Chain<'_, '_>, now_secs: u64) -> Result<Option<String>, VerifyError> {
    use x509_parser::prelude::FromDer;
    let mut checked = Vec::new();
    for (i, der) in crls.iter().enumerate() {
        let crl = match x509_parser::revocation_list::CertificateRevocationList::from_der(der) {
            Ok(([], crl)) => crl,
            Ok((rest, _)) => return Err(malformed(format!("CRL {i}: {} bytes follow it", rest.len()))),
            Err(e) => return Err(malformed(format!("CRL {i}: {e}"))),
        };
        if crl.issuer().as_raw() != chain.ark.subject().as_raw() {
            return Err(chain_error(format!("CRL {i} is issued by {}, not by the ARK {}", crl.issuer(), chain.ark.subject())));
        }
        let signed = crl.signature_algorithm.algorithm == OID_PKCS1_RSASSAPSS
            && crl.signature_value.unused_bits == 0
            && UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA384, &chain.ark.public_key().subject_public_key.data)
                .verify(crl.tbs_cert_list.as_ref(), &crl.signature_value.data)
                .is_ok();
        if !signed {
            return Err(VerifyError::BadSignature { format: F, what: format!("CRL {i} (by the ARK {})", common_name(chain.ark)) });
        }
        let now = i64::try_from(now_secs).unwrap_or(i64::MAX);
        let next = crl.next_update().map(|t| t.timestamp());
        if now < crl.last_update().timestamp() || next.is_none_or(|n| now > n) {
            return Err(VerifyError::NotValidAtTime {
                format: F,
                what: format!(
                    "CRL {i} (this update {}, next update {})",
                    crl.last_update(),
                    crl.next_update().map_or_else(|| "none".into(), |t| t.to_string())
                ),
            });
        }
        if crl.iter_revoked_certificates().any(|r| r.raw_serial() == chain.ask.raw_serial()) {
            return Err(VerifyError::Revoked { format: F, what: format!("the ASK {} (serial {})", common_name(chain.ask), chain.ask.raw_serial_as_string()) });
        }
        checked.push(format!("ARK CRL of {} ({} revoked)", crl.last_update(), crl.iter_revoked_certificates().count()));
    }
    Ok((!checked.is_empty()).then(|| checked.join("; ")))
}

/// Splits endorsements into DER certificates: an item starting with a DER SEQUENCE is one
/// certificate, anything else is read as PEM holding one or more.
fn decode_certificates(items: &[Vec<u8>], err: impl Fn(usize, String) -> VerifyError) -> Result<Vec<Vec<u8>>, VerifyError> {
    let mut ders = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if item.first() == Some(&0x30) {
            ders.push(item.clone());
            continue;
        }
        let before = ders.len();
        for pem in x509_parser::pem::Pem::iter_from_buffer(item) {
            let pem = pem.map_err(|e| err(i, format!("bad PEM: {e}")))?;
            if pem.label == "CERTIFICATE" {
                ders.push(pem.contents);
            }
        }
        if ders.len() == before {
            return Err(err(i, "neither a DER certificate nor PEM holding one".into()));
        }
    }
    Ok(ders)
}

fn parse_all<'a>(ders: &'a [Vec<u8>], err: impl Fn(usize, String) -> VerifyError) -> Result<Vec<X509Certificate<'a>>, VerifyError> {
    ders.iter()
        .enumerate()
        .map(|(i, der)| match X509Certificate::from_der(der) {
            Ok(([], cert)) => Ok(cert),
            Ok((rest, _)) => Err(err(i, format!("{} bytes follow the certificate", rest.len()))),
            Err(e) => Err(err(i, format!("not an X.509 certificate: {e}"))),
        })
        .collect()
}

/// Chains whose signatures verified (ARK self-signature, ARK → ASK, ASK → VCEK), keyed by
/// the SHA-256 of every certificate involved: the supplied endorsements and the trust
/// anchors, each length-prefixed. A hit means byte-identical certificates, so the same
/// signatures verify, and the three RSA-PSS checks are skipped. Validity periods, the
/// report's own signature and the TCB extensions are still checked on every call, so a
/// cached chain cannot outlive its certificates. Bounded: emptied when it reaches
/// [`CHAIN_CACHE_MAX`] entries.
static CHAIN_CACHE: std::sync::OnceLock<std::sync::Mutex<ChainCache>> = std::sync::OnceLock::new();
/// Certificate-set digest → (VCEK index, ASK index) among the supplied certificates, ARK index among the anchors.
type ChainCache = std::collections::HashMap<[u8; 32], (usize, usize, usize)>;
pub const CHAIN_CACHE_MAX: usize = 256;

/// Forgets every cached chain (for benchmarks and tests).
pub fn clear_chain_cache() {
    if let Some(c) = CHAIN_CACHE.get() {
        c.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }
}

fn chain_key(supplied: &[X509Certificate<'_>], anchors: &[X509Certificate<'_>]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (tag, set) in [(b'S', supplied), (b'A', anchors)] {
        for c in set {
            h.update([tag]);
            h.update((c.as_raw().len() as u64).to_le_bytes());
            h.update(c.as_raw());
        }
    }
    h.finalize().into()
}

/// [`build_chain`], remembering the chains that verified.
fn cached_chain<'c, 'a>(supplied: &'c [X509Certificate<'a>], anchors: &'c [X509Certificate<'a>]) -> Result<Chain<'c, 'a>, VerifyError> {
    let cache = CHAIN_CACHE.get_or_init(Default::default);
    let key = chain_key(supplied, anchors);
    let hit = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key).copied();
    if let Some((l, s, a)) = hit {
        if let (Some(leaf), Some(ask), Some(ark)) = (supplied.get(l), supplied.get(s), anchors.get(a)) {
            return Ok(Chain { leaf, ask, ark });
        }
    }
    let chain = build_chain(supplied, anchors)?;
    let index = |set: &[X509Certificate<'a>], c: &X509Certificate<'a>| set.iter().position(|x| std::ptr::eq(x, c));
    if let (Some(l), Some(s), Some(a)) = (index(supplied, chain.leaf), index(supplied, chain.ask), index(anchors, chain.ark)) {
        let mut map = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= CHAIN_CACHE_MAX {
            map.clear();
        }
        map.insert(key, (l, s, a));
    }
    Ok(chain)
}

struct Chain<'c, 'a> {
    leaf: &'c X509Certificate<'a>,
    ask: &'c X509Certificate<'a>,
    ark: &'c X509Certificate<'a>,
}

fn is_self_issued(c: &X509Certificate<'_>) -> bool {
    c.subject().as_raw() == c.issuer().as_raw()
}

fn common_name(c: &X509Certificate<'_>) -> String {
    c.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map_or_else(|| c.subject().to_string(), str::to_string)
}

/// Finds leaf → ASK → ARK by name among the supplied certificates, requires the ARK to be a
/// trusted one, and checks each signature.
fn build_chain<'c, 'a>(supplied: &'c [X509Certificate<'a>], anchors: &'c [X509Certificate<'a>]) -> Result<Chain<'c, 'a>, VerifyError> {
    let missing = |what: &str| VerifyError::MissingEndorsement { format: F, what: what.into() };
    let mut leaves = supplied.iter().filter(|c| c.public_key().algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY);
    let leaf = leaves.next().ok_or_else(|| missing("the VCEK or VLEK certificate (no certificate with an EC key)"))?;
    if leaves.next().is_some() {
        return Err(malformed("more than one certificate with an EC key: which is the VCEK is ambiguous"));
    }
    let curve = leaf.public_key().algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&OID_NIST_EC_P384) {
        return Err(chain_error("the VCEK's key is not on P-384"));
    }

    // A supplied root must be a trusted one, whether or not the chain needs it.
    let trusted = |c: &X509Certificate<'_>| anchors.iter().any(|a| a.as_raw() == c.as_raw() || a.public_key().raw == c.public_key().raw);
    if supplied.iter().any(|c| is_self_issued(c) && !trusted(c)) {
        return Err(VerifyError::UntrustedRoot { format: F });
    }

    let intermediates: Vec<_> = supplied.iter().filter(|c| !std::ptr::eq(*c, leaf) && !is_self_issued(c)).collect();
    if intermediates.is_empty() {
        return Err(missing("the ASK (or ASVK) certificate"));
    }
    let named: Vec<_> = intermediates.iter().copied().filter(|c| c.subject().as_raw() == leaf.issuer().as_raw()).collect();
    if named.is_empty() {
        return Err(chain_error(format!("no supplied ASK is the VCEK's issuer ({})", leaf.issuer())));
    }
    let ask =
        named.into_iter().find(|ask| signed_by(leaf, ask)).ok_or_else(|| chain_error(format!("the VCEK's signature by {} does not verify", leaf.issuer())))?;

    let ark = anchors.iter().find(|a| a.subject().as_raw() == ask.issuer().as_raw()).ok_or(VerifyError::UntrustedRoot { format: F })?;
    if !signed_by(ask, ark) {
        return Err(chain_error(format!("the ASK's signature by {} does not verify", ask.issuer())));
    }
    if !is_self_issued(ark) || !signed_by(ark, ark) {
        return Err(chain_error(format!("the ARK {} is not self-signed", ark.subject())));
    }
    Ok(Chain { leaf, ask, ark })
}

/// AMD signs its certificates with RSASSA-PSS, SHA-384, MGF1-SHA-384 and a 48-byte salt.
fn signed_by(child: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    child.signature_algorithm.algorithm == OID_PKCS1_RSASSAPSS
        && unsigned_parts_are_strict(child.as_raw())
        && child.signature_value.unused_bits == 0
        && UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA384, &issuer.public_key().subject_public_key.data)
            .verify(child.tbs_certificate.as_ref(), &child.signature_value.data)
            .is_ok()
}

/// The raw DER of each element inside one DER element (a SEQUENCE).
fn der_children(element: &[u8]) -> Option<Vec<&[u8]>> {
    let (rest, outer) = Any::from_der(element).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let mut children = Vec::new();
    let mut input = outer.data;
    while !input.is_empty() {
        let (rest, _) = Any::from_der(input).ok()?;
        children.push(input.get(..input.len().checked_sub(rest.len())?)?);
        input = rest;
    }
    Some(children)
}

/// The bytes of a certificate outside its signed part are checked strictly, so that none can
/// vary while the certificate still verifies: the signature algorithm there must be, byte for
/// byte, the signed one (RFC 5280 4.1.1.2), and the tags must be SEQUENCE, SEQUENCE, BIT
/// STRING. The parser alone is lenient about both.
fn unsigned_parts_are_strict(certificate: &[u8]) -> bool {
    let Some(parts) = der_children(certificate) else { return false };
    let [tbs, outer_algorithm, signature] = parts.as_slice() else { return false };
    let Some(tbs_fields) = der_children(tbs) else { return false };
    // TBSCertificate: [0] version (optional), serialNumber, signature, ...
    let at = if tbs_fields.first().and_then(|f| f.first()) == Some(&0xA0) { 2 } else { 1 };
    certificate.first() == Some(&0x30) && tbs.first() == Some(&0x30) && signature.first() == Some(&0x03) && tbs_fields.get(at) == Some(outer_algorithm)
}

fn check_validity(cert: &X509Certificate<'_>, what: &str, now_secs: u64) -> Result<(), VerifyError> {
    let now = i64::try_from(now_secs).unwrap_or(i64::MAX);
    let v = cert.validity();
    if now < v.not_before.timestamp() || now > v.not_after.timestamp() {
        return Err(VerifyError::NotValidAtTime { format: F, what: format!("{what} (valid from {} to {})", v.not_before, v.not_after) });
    }
    Ok(())
}

/// AMD's VCEK extensions (publication 57230): the TCB the key was derived for, and the chip.
const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";

fn extension<'c>(cert: &'c X509Certificate<'_>, oid: &str) -> Option<&'c [u8]> {
    cert.extensions().iter().find(|e| e.oid.to_id_string() == oid).map(|e| e.value)
}

/// An SPL extension's value is a DER INTEGER.
fn spl(cert: &X509Certificate<'_>, name: &str, oid: &str) -> Result<Option<u8>, VerifyError> {
    let tcb = |status: String| VerifyError::Tcb { format: F, status };
    let Some(value) = extension(cert, oid) else { return Ok(None) };
    let (_, int) = x509_parser::der_parser::der::parse_der_integer(value).map_err(|_| tcb(format!("the VCEK's {name} is not a DER integer")))?;
    let n = int.as_u32().map_err(|_| tcb(format!("the VCEK's {name} is not a small integer")))?;
    u8::try_from(n).map(Some).map_err(|_| tcb(format!("the VCEK's {name} {n} exceeds 255")))
}

/// The VCEK is derived for one TCB and one chip; a report signed with it must state the same.
fn check_tcb_extensions(report: &AttestationReport, leaf: &X509Certificate<'_>) -> Result<(), VerifyError> {
    let tcb = |status: String| VerifyError::Tcb { format: F, status };
    let t = report.reported_tcb;
    let required =
        [("blSPL", OID_BL_SPL, t.boot_loader), ("teeSPL", OID_TEE_SPL, t.tee), ("snpSPL", OID_SNP_SPL, t.snp), ("ucodeSPL", OID_UCODE_SPL, t.microcode)];
    for (name, oid, reported) in required {
        match spl(leaf, name, oid)? {
            None => return Err(tcb(format!("the certificate has no {name} extension ({oid})"))),
            Some(certified) if certified != reported => {
                return Err(tcb(format!("the certificate's {name} is {certified} but REPORTED_TCB says {reported}")));
            }
            Some(_) => {}
        }
    }
    if let (Some(reported), Some(certified)) = (t.fmc, spl(leaf, "fmcSPL", OID_FMC_SPL)?) {
        if certified != reported {
            return Err(tcb(format!("the certificate's fmcSPL is {certified} but REPORTED_TCB says {reported}")));
        }
    }
    // A VLEK is not tied to a chip, and MASK_CHIP_KEY zeroes CHIP_ID.
    if report.signing_key == SigningKey::Vcek && !report.mask_chip_key {
        let value = extension(leaf, OID_HWID).ok_or_else(|| tcb(format!("the VCEK has no hwid extension ({OID_HWID})")))?;
        // AMD stores the raw bytes; accept a DER OCTET STRING around them too.
        let hwid = match x509_parser::der_parser::der::parse_der_octetstring(value) {
            Ok(([], obj)) => obj.as_slice().unwrap_or(value),
            _ => value,
        };
        // Milan and Genoa certify all 64 bytes of CHIP_ID; Turin certifies a shorter prefix.
        if hwid.is_empty() || report.chip_id.get(..hwid.len()) != Some(hwid) {
            return Err(tcb(format!("the VCEK's hwid {} is not the report's CHIP_ID", hex::encode(hwid))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MILAN_REPORT: &[u8] = include_bytes!("../tests/vectors/sev-snp/milan-virtee/report.bin");
    const MILAN_VCEK: &[u8] = include_bytes!("../tests/vectors/sev-snp/milan-virtee/vcek.der");

    #[test]
    fn layout_of_a_real_report() {
        let r = AttestationReport::parse(MILAN_REPORT).unwrap();
        assert_eq!(r.version, 2);
        assert_eq!(r.policy, 0x30000);
        assert!(!r.debug_allowed());
        assert_eq!(r.signing_key, SigningKey::Vcek);
        assert_eq!((r.reported_tcb.boot_loader, r.reported_tcb.tee, r.reported_tcb.snp, r.reported_tcb.microcode), (3, 0, 8, 0x73));
        assert_eq!(r.reported_tcb.fmc, None);
        assert_eq!(r.cpuid_fam_id, None);
        assert_eq!(r.signed_bytes().len(), SIGNED_LEN);
        assert_eq!(r.current_major, 1);
    }

    #[test]
    fn pinned_roots_are_self_signed_amd_arks() {
        for (name, pem) in PINNED_ARKS {
            let ders = decode_certificates(&[pem.to_vec()], |_, why| malformed(why)).unwrap();
            let certs = parse_all(&ders, |_, why| malformed(why)).unwrap();
            assert_eq!(certs.len(), 1, "{name}");
            assert!(is_self_issued(&certs[0]) && signed_by(&certs[0], &certs[0]), "{name}");
            assert_eq!(common_name(&certs[0]), format!("ARK-{name}"));
        }
    }

    #[test]
    fn turin_tcb_layout() {
        let t = TcbVersion::decode([1, 2, 3, 4, 0, 0, 0, 5], true);
        assert_eq!((t.fmc, t.boot_loader, t.tee, t.snp, t.microcode), (Some(1), 2, 3, 4, 5));
        let g = TcbVersion::decode([1, 2, 0, 0, 0, 0, 3, 4], false);
        assert_eq!((g.fmc, g.boot_loader, g.tee, g.snp, g.microcode), (None, 1, 2, 3, 4));
    }

    #[test]
    fn tcb_extensions_must_match_the_report() {
        let (_, vcek) = X509Certificate::from_der(MILAN_VCEK).unwrap();
        let report = AttestationReport::parse(MILAN_REPORT).unwrap();
        check_tcb_extensions(&report, &vcek).unwrap();

        let mut newer = report.clone();
        newer.reported_tcb.snp += 1;
        assert!(matches!(check_tcb_extensions(&newer, &vcek), Err(VerifyError::Tcb { .. })));

        let mut other_chip = report.clone();
        other_chip.chip_id[0] ^= 1;
        assert!(matches!(check_tcb_extensions(&other_chip, &vcek), Err(VerifyError::Tcb { .. })));
        // With MASK_CHIP_KEY the chip is not named, so it is not compared.
        other_chip.mask_chip_key = true;
        check_tcb_extensions(&other_chip, &vcek).unwrap();
    }

    #[test]
    fn signature_conversion_rejects_oversized_scalars() {
        let mut r = AttestationReport::parse(MILAN_REPORT).unwrap();
        let sig = r.signature_p1363().unwrap();
        assert_eq!(sig[47], r.signature_r[0]);
        assert_eq!(sig[48], r.signature_s[47]);
        r.signature_s[60] = 1;
        assert!(r.signature_p1363().is_none());
    }
}
