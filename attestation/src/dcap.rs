//! Intel DCAP quotes: TDX (quote v4 and v5) and SGX (quote v3), verified offline against
//! their collateral at a caller-supplied time, chained to the pinned Intel SGX Root CA.
//! Layouts: Intel TDX DCAP Quoting Library API (quote v4/v5 and the TD report bodies) and
//! Intel SGX ECDSA Quote Library API (quote v3).
//!
//! Parse, then verify. [`parse_quote`] reads the quote from explicit offsets and never
//! panics. The cryptography and the TCB evaluation are dcap-qvl's (`QuoteVerifier` with our
//! pinned root and the ring backend). dcap-qvl reports failures as strings, so verification
//! runs in stages, in this order, each failing with its own [`VerifyError`] variant:
//! 1. parse the quote (`Malformed`);
//! 2. read the collateral (`MissingEndorsement`, `Malformed`);
//! 3. every self-signed certificate offered must be the pinned root (`UntrustedRoot`), and
//!    TCB Info and QE Identity must be signed by Intel's TCB Signing certificate
//!    (`CertificateChain`);
//! 4. every dated item (TCB Info, QE Identity, both CRLs, every certificate) must be valid
//!    at `now` (`NotValidAtTime`);
//! 5. dcap-qvl: signatures, chains, CRLs, QE identity, TCB level match, TD attributes; its
//!    failure is mapped by the check that failed (`BadSignature`, `CertificateChain`,
//!    `UntrustedRoot`, `Revoked`, `Tcb`, `MissingEndorsement`, …);
//! 6. the TCB Info must be for the PCK certificate's PCE ID (`MissingEndorsement`; dcap-qvl
//!    0.7.1 does not check it).
//!
//! Signatures that verified are remembered ([`SignatureCache`]), so a verifier that sees
//! quotes from the same platforms re-checks the PCK chain, the CRLs, the TCB Info and the
//! QE Identity signatures only when their bytes change; times, revocation and the TCB
//! match are evaluated every call, and the quote's own signature is new with each quote.
//!
//! A TCB status other than `UpToDate` is not a failure: it is returned in [`Claims::tcb`]
//! and [`Claims::fields`] for the node policy to judge. A `Revoked` TCB is (`Revoked`).

use std::collections::BTreeMap;

use dcap_qvl::verify::QuoteVerifier;
use dcap_qvl::{QuoteClaims, QuoteCollateralV3, QuotePolicy};
use serde::Deserialize;
use x509_cert::der::Decode;

use crate::{Claims, Format, Verifier, VerifyError};

/// dcap-qvl's audited ring configuration, with every ECDSA P-256 verification going
/// through [`SignatureCache`].
#[derive(Debug)]
pub struct CachedRingConfig;

impl dcap_qvl::config::Config for CachedRingConfig {
    type X509 = dcap_qvl::x509::X509CertBackend;
    type SigEncoder = dcap_qvl::signature::DerSigEncoder;
    type Crypto = CachedRingCrypto;
}

#[derive(Debug)]
pub struct CachedRingCrypto;

impl dcap_qvl::config::CryptoProvider for CachedRingCrypto {
    fn sig_algo() -> &'static dyn rustls_pki_types::SignatureVerificationAlgorithm {
        &SIGNATURE_CACHE
    }
    fn sha256(data: &[u8]) -> [u8; 32] {
        <dcap_qvl::crypto::RingCrypto as dcap_qvl::config::CryptoProvider>::sha256(data)
    }
    fn sha384(data: &[u8]) -> [u8; 48] {
        <dcap_qvl::crypto::RingCrypto as dcap_qvl::config::CryptoProvider>::sha384(data)
    }
}

/// ECDSA P-256 / SHA-256 (ring, through webpki) that remembers which (public key,
/// message, signature) triples verified, by the SHA-256 of the three, each
/// length-prefixed. A hit means byte-identical inputs, for which the (deterministic)
/// verification would succeed again; anything else, and every failure, is verified in
/// full. Bounded: emptied when it reaches [`SIGNATURE_CACHE_MAX`] entries.
#[derive(Debug)]
pub struct SignatureCache {
    verified: std::sync::Mutex<Option<std::collections::HashSet<[u8; 32]>>>,
}

pub const SIGNATURE_CACHE_MAX: usize = 4096;

static SIGNATURE_CACHE: SignatureCache = SignatureCache { verified: std::sync::Mutex::new(None) };

/// Forgets every remembered signature (for benchmarks and tests).
pub fn clear_signature_cache() {
    *SIGNATURE_CACHE.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
}

/// How many signatures are remembered.
pub fn signature_cache_len() -> usize {
    SIGNATURE_CACHE.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map_or(0, |s| s.len())
}

impl rustls_pki_types::SignatureVerificationAlgorithm for SignatureCache {
    fn verify_signature(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), rustls_pki_types::InvalidSignature> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [public_key, message, signature] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let key: [u8; 32] = h.finalize().into();
        let lock = || self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if lock().as_ref().is_some_and(|s| s.contains(&key)) {
            return Ok(());
        }
        webpki::ring::ECDSA_P256_SHA256.verify_signature(public_key, message, signature)?;
        let mut guard = lock();
        let verified = guard.get_or_insert_with(Default::default);
        if verified.len() >= SIGNATURE_CACHE_MAX {
            verified.clear();
        }
        verified.insert(key);
        Ok(())
    }
    fn public_key_alg_id(&self) -> rustls_pki_types::AlgorithmIdentifier {
        webpki::ring::ECDSA_P256_SHA256.public_key_alg_id()
    }
    fn signature_alg_id(&self) -> rustls_pki_types::AlgorithmIdentifier {
        webpki::ring::ECDSA_P256_SHA256.signature_alg_id()
    }
}

/// The Intel SGX Root CA, the one trust anchor of DCAP (see `roots/intel/PROVENANCE.md`).
pub static INTEL_SGX_ROOT_CA_DER: &[u8] = include_bytes!("../roots/intel/intel_sgx_root_ca.der");

const HEADER_LEN: usize = 48;
const TEE_TYPE_SGX: u32 = 0x0000_0000;
const TEE_TYPE_TDX: u32 = 0x0000_0081;
const ATTESTATION_KEY_ECDSA_P256: u16 = 2;
const INTEL_QE_VENDOR_ID: [u8; 16] = [0x93, 0x9A, 0x72, 0x33, 0xF7, 0x9C, 0x4C, 0xA9, 0x94, 0x0A, 0x0D, 0xB3, 0x95, 0x7F, 0x06, 0x07];
const TD_REPORT10_LEN: usize = 584;
const TD_REPORT15_LEN: usize = 648;
const TD_REPORT15_EX_LEN: usize = 885;
/// Certification data types (Intel DCAP quote spec): 5 = PCK certificate chain (PEM),
/// 6 = QE report certification data (quote v4/v5).
const CERT_DATA_PCK_CHAIN: u16 = 5;
const CERT_DATA_QE_REPORT: u16 = 6;
/// Subject CN of the certificate that signs TCB Info and QE Identity.
const TCB_SIGNING_CN: &str = "Intel SGX TCB Signing";

/// Which TEE produced a quote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tee {
    Tdx,
    Sgx,
}

impl Tee {
    pub fn format(self) -> Format {
        match self {
            Tee::Tdx => Format::Tdx,
            Tee::Sgx => Format::SgxDcap,
        }
    }
}

/// An SGX enclave report (`sgx_report_body_t`, 384 bytes): the body of an SGX quote, and
/// the Quoting Enclave's report inside every quote's signature data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnclaveReport {
    pub cpu_svn: [u8; 16],
    pub misc_select: u32,
    pub attributes: [u8; 16],
    pub mr_enclave: [u8; 32],
    pub mr_signer: [u8; 32],
    pub isv_prod_id: u16,
    pub isv_svn: u16,
    pub report_data: [u8; 64],
}

/// A TD report body: TDX 1.0 (`TD_REPORT10`, 584 bytes) or TDX 1.5 (648 bytes, or 885 for
/// the 1.5ex body, of which the fields below are the first 648 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TdReport {
    /// Quote v5 body type (2 = TDX 1.0, 3 = TDX 1.5, 4 = TDX 1.5ex); 2 for quote v4.
    pub body_type: u16,
    pub tee_tcb_svn: [u8; 16],
    pub mr_seam: [u8; 48],
    pub mr_signer_seam: [u8; 48],
    pub seam_attributes: [u8; 8],
    pub td_attributes: [u8; 8],
    pub xfam: [u8; 8],
    pub mr_td: [u8; 48],
    pub mr_config_id: [u8; 48],
    pub mr_owner: [u8; 48],
    pub mr_owner_config: [u8; 48],
    pub rtmr: [[u8; 48]; 4],
    pub report_data: [u8; 64],
    /// TDX 1.5 only.
    pub tee_tcb_svn2: Option<[u8; 16]>,
    /// TDX 1.5 only.
    pub mr_service_td: Option<[u8; 48]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuoteBody {
    Sgx(EnclaveReport),
    Td(Box<TdReport>),
}

/// A parsed DCAP quote. Nothing in it is verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DcapQuote {
    pub version: u16,
    pub tee: Tee,
    pub qe_svn: u16,
    pub pce_svn: u16,
    pub user_data: [u8; 20],
    pub body: QuoteBody,
    /// The header and body, `[0, signed_len)`, are what the attestation key signs.
    pub signed_len: usize,
    pub signature: [u8; 64],
    pub attestation_key: [u8; 64],
    pub qe_report: EnclaveReport,
    pub qe_report_signature: [u8; 64],
    pub qe_auth_data: Vec<u8>,
    /// Innermost certification data: type 5 is the PEM PCK chain (leaf, PCK CA, root).
    pub cert_data_type: u16,
    pub cert_data: Vec<u8>,
}

impl DcapQuote {
    /// MRTD (TDX) or MRENCLAVE (SGX).
    pub fn measurement(&self) -> &[u8] {
        match &self.body {
            QuoteBody::Td(td) => &td.mr_td,
            QuoteBody::Sgx(e) => &e.mr_enclave,
        }
    }

    pub fn report_data(&self) -> &[u8; 64] {
        match &self.body {
            QuoteBody::Td(td) => &td.report_data,
            QuoteBody::Sgx(e) => &e.report_data,
        }
    }

    /// TDX: any bit of the TUD ("TD under debug") group, bits 7:0 of TDATTRIBUTES: bit 0 is
    /// DEBUG, the others are reserved or let the host observe the TD, and the TDX ABI calls a
    /// TD with any of them set untrusted. SGX: ATTRIBUTES.DEBUG (bit 1).
    pub fn debug(&self) -> bool {
        match &self.body {
            QuoteBody::Td(td) => td.td_attributes[0] != 0,
            QuoteBody::Sgx(e) => e.attributes[0] & 0x02 != 0,
        }
    }
}

/// A bounds-checked little-endian reader: every read names its field, so a short quote says
/// which field it lacks.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let slice = self
            .pos
            .checked_add(n)
            .and_then(|end| self.bytes.get(self.pos..end))
            .ok_or_else(|| format!("truncated: {what} needs {n} bytes at offset {}, {} remain", self.pos, self.bytes.len().saturating_sub(self.pos)))?;
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let slice = self.take(N, what)?;
        <[u8; N]>::try_from(slice).map_err(|_| format!("{what}: length"))
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    fn finish(&self, what: &str) -> Result<(), String> {
        match self.rest().len() {
            0 => Ok(()),
            n => Err(format!("{n} unexpected bytes after {what}")),
        }
    }
}

/// `sgx_report_body_t`: CPUSVN @0, MISCSELECT @16, ATTRIBUTES @48, MRENCLAVE @64,
/// MRSIGNER @128, ISVPRODID @256, ISVSVN @258, REPORTDATA @320 (384 bytes).
fn read_enclave_report(r: &mut Reader<'_>, what: &str) -> Result<EnclaveReport, String> {
    let cpu_svn = r.array(&format!("{what} CPUSVN"))?;
    let misc_select = r.u32(&format!("{what} MISCSELECT"))?;
    r.take(28, &format!("{what} reserved"))?;
    let attributes = r.array(&format!("{what} ATTRIBUTES"))?;
    let mr_enclave = r.array(&format!("{what} MRENCLAVE"))?;
    r.take(32, &format!("{what} reserved"))?;
    let mr_signer = r.array(&format!("{what} MRSIGNER"))?;
    r.take(96, &format!("{what} reserved"))?;
    let isv_prod_id = r.u16(&format!("{what} ISVPRODID"))?;
    let isv_svn = r.u16(&format!("{what} ISVSVN"))?;
    r.take(60, &format!("{what} reserved"))?;
    let report_data = r.array(&format!("{what} REPORTDATA"))?;
    Ok(EnclaveReport { cpu_svn, misc_select, attributes, mr_enclave, mr_signer, isv_prod_id, isv_svn, report_data })
}

/// `TD_REPORT10`: TEE_TCB_SVN @0, MRSEAM @16, MRSIGNERSEAM @64, SEAMATTRIBUTES @112,
/// TDATTRIBUTES @120, XFAM @128, MRTD @136, MRCONFIGID @184, MROWNER @232,
/// MROWNERCONFIG @280, RTMR0-3 @328/376/424/472, REPORTDATA @520 (584 bytes); TDX 1.5 adds
/// TEE_TCB_SVN2 @584 and MRSERVICETD @600 (648 bytes).
fn read_td_report(r: &mut Reader<'_>, body_type: u16) -> Result<TdReport, String> {
    let tee_tcb_svn = r.array("TEE_TCB_SVN")?;
    let mr_seam = r.array("MRSEAM")?;
    let mr_signer_seam = r.array("MRSIGNERSEAM")?;
    let seam_attributes = r.array("SEAMATTRIBUTES")?;
    let td_attributes = r.array("TDATTRIBUTES")?;
    let xfam = r.array("XFAM")?;
    let mr_td = r.array("MRTD")?;
    let mr_config_id = r.array("MRCONFIGID")?;
    let mr_owner = r.array("MROWNER")?;
    let mr_owner_config = r.array("MROWNERCONFIG")?;
    let rtmr = [r.array("RTMR0")?, r.array("RTMR1")?, r.array("RTMR2")?, r.array("RTMR3")?];
    let report_data = r.array("REPORTDATA")?;
    let (tee_tcb_svn2, mr_service_td) = if body_type >= 3 { (Some(r.array("TEE_TCB_SVN2")?), Some(r.array("MRSERVICETD")?)) } else { (None, None) };
    if body_type == 4 {
        // TDX 1.5ex appends fields (VM index, TD ID, service TD hashes, initial TCB) that
        // Intel's QVL and dcap-qvl do not appraise; they are signed but not decoded here.
        r.take(TD_REPORT15_EX_LEN - TD_REPORT15_LEN, "TDX 1.5ex extension")?;
    }
    Ok(TdReport {
        body_type,
        tee_tcb_svn,
        mr_seam,
        mr_signer_seam,
        seam_attributes,
        td_attributes,
        xfam,
        mr_td,
        mr_config_id,
        mr_owner,
        mr_owner_config,
        rtmr,
        report_data,
        tee_tcb_svn2,
        mr_service_td,
    })
}

/// The TEE a quote's header names, if it is a quote this module handles: SGX quote v3, or
/// TDX quote v4/v5: a full 48-byte header whose version (u16 @0) and TEE type (u32 @4) match.
pub fn detect_tee(evidence: &[u8]) -> Option<Tee> {
    let header = evidence.get(..HEADER_LEN)?;
    let version = u16::from_le_bytes([*header.first()?, *header.get(1)?]);
    let tee_type = u32::from_le_bytes([*header.get(4)?, *header.get(5)?, *header.get(6)?, *header.get(7)?]);
    match (version, tee_type) {
        (3, TEE_TYPE_SGX) => Some(Tee::Sgx),
        (4 | 5, TEE_TYPE_TDX) => Some(Tee::Tdx),
        _ => None,
    }
}

/// Parses a DCAP quote (SGX v3, TDX v4/v5). Never panics. Trailing bytes after the
/// signature data are tolerated only as zero padding (drivers return quotes in zero-filled
/// buffers); any other trailing or missing byte is `Malformed` (of `Format::Tdx` when the
/// header names neither TEE).
pub fn parse_quote(bytes: &[u8]) -> Result<DcapQuote, VerifyError> {
    let format = detect_tee(bytes).map_or(Format::Tdx, Tee::format);
    parse(bytes).map_err(|why| VerifyError::Malformed { format, why })
}

fn parse(bytes: &[u8]) -> Result<DcapQuote, String> {
    let mut r = Reader::new(bytes);
    // Header (48 bytes): version @0, attestation key type @2, TEE type @4, QE SVN @8,
    // PCE SVN @10, QE vendor ID @12, user data @28.
    let version = r.u16("header version")?;
    let key_type = r.u16("header attestation key type")?;
    let tee_type = r.u32("header TEE type")?;
    let qe_svn = r.u16("header QE SVN")?;
    let pce_svn = r.u16("header PCE SVN")?;
    let qe_vendor_id: [u8; 16] = r.array("header QE vendor ID")?;
    let user_data = r.array("header user data")?;
    let tee = match (version, tee_type) {
        (3, TEE_TYPE_SGX) => Tee::Sgx,
        (4 | 5, TEE_TYPE_TDX) => Tee::Tdx,
        _ => return Err(format!("quote version {version} with TEE type {tee_type:#x} is neither SGX quote v3 nor TDX quote v4/v5")),
    };
    if key_type != ATTESTATION_KEY_ECDSA_P256 {
        return Err(format!("attestation key type {key_type} is not ECDSA-256-with-P-256 (2)"));
    }
    if qe_vendor_id != INTEL_QE_VENDOR_ID {
        return Err(format!("QE vendor ID {} is not Intel's", hex::encode(qe_vendor_id)));
    }
    let body = match version {
        3 => QuoteBody::Sgx(read_enclave_report(&mut r, "report body")?),
        4 => QuoteBody::Td(Box::new(read_td_report(&mut r, 2)?)),
        _ => {
            // Quote v5: body type u16 @48, body size u32 @50, body @54.
            let body_type = r.u16("v5 body type")?;
            let size = r.u32("v5 body size")?;
            let expected = match body_type {
                2 => TD_REPORT10_LEN,
                3 => TD_REPORT15_LEN,
                4 => TD_REPORT15_EX_LEN,
                other => return Err(format!("quote v5 body type {other} is not a TD report (2, 3 or 4)")),
            };
            if usize::try_from(size).ok() != Some(expected) {
                return Err(format!("quote v5 body type {body_type} must be {expected} bytes, the header says {size}"));
            }
            QuoteBody::Td(Box::new(read_td_report(&mut r, body_type)?))
        }
    };
    let signed_len = r.pos;

    let sig_len = r.u32("signature data length")?;
    let sig_data = r.take(usize::try_from(sig_len).map_err(|_| "signature data length".to_string())?, "signature data")?;
    if let Some(i) = r.rest().iter().position(|b| *b != 0) {
        return Err(format!("non-zero byte at offset {} after the signature data", r.pos + i));
    }

    let mut s = Reader::new(sig_data);
    let signature = s.array("quote signature")?;
    let attestation_key = s.array("attestation key")?;
    // v3: the QE report and the PCK data follow directly. v4/v5: they are wrapped in
    // certification data of type 6 (QE report certification data).
    let qe_data = if version == 3 {
        s.rest()
    } else {
        let outer_type = s.u16("certification data type")?;
        if outer_type != CERT_DATA_QE_REPORT {
            return Err(format!("certification data type {outer_type} is not QE report certification data (6)"));
        }
        let size = s.u32("certification data size")?;
        let data = s.take(usize::try_from(size).map_err(|_| "certification data size".to_string())?, "certification data")?;
        s.finish("the certification data")?;
        data
    };
    let mut q = Reader::new(qe_data);
    let qe_report = read_enclave_report(&mut q, "QE report")?;
    let qe_report_signature = q.array("QE report signature")?;
    let auth_len = q.u16("QE authentication data size")?;
    let qe_auth_data = q.take(usize::from(auth_len), "QE authentication data")?.to_vec();
    let cert_data_type = q.u16("PCK certification data type")?;
    let cert_size = q.u32("PCK certification data size")?;
    let cert_data = q.take(usize::try_from(cert_size).map_err(|_| "PCK certification data size".to_string())?, "PCK certification data")?.to_vec();
    q.finish("the PCK certification data")?;

    Ok(DcapQuote {
        version,
        tee,
        qe_svn,
        pce_svn,
        user_data,
        body,
        signed_len,
        signature,
        attestation_key,
        qe_report,
        qe_report_signature,
        qe_auth_data,
        cert_data_type,
        cert_data,
    })
}

/// Verifies DCAP quotes of one TEE: [`DcapVerifier::tdx`] (`Format::Tdx`) or
/// [`DcapVerifier::sgx`] (`Format::SgxDcap`). The one endorsement is the collateral: a
/// dcap-qvl `QuoteCollateralV3` as JSON (TCB Info, QE Identity, their signatures and issuer
/// chains, the root CA and PCK CRLs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DcapVerifier {
    tee: Tee,
}

impl DcapVerifier {
    pub const fn tdx() -> Self {
        DcapVerifier { tee: Tee::Tdx }
    }

    pub const fn sgx() -> Self {
        DcapVerifier { tee: Tee::Sgx }
    }

    pub fn tee(&self) -> Tee {
        self.tee
    }

    /// Verification against any root; only this module's tests use another than the pinned one.
    fn verify_with_root(&self, evidence: &[u8], endorsements: &[Vec<u8>], now_secs: u64, root_der: &[u8]) -> Result<Claims, VerifyError> {
        let format = self.tee.format();
        let malformed = |why: String| VerifyError::Malformed { format, why };

        // 1. The quote.
        let quote = parse(evidence).map_err(malformed)?;
        if quote.tee != self.tee {
            return Err(malformed(format!("a {:?} quote given to the {:?} verifier", quote.tee, self.tee)));
        }

        // 2. The collateral.
        let mut collateral = read_collateral(endorsements, format)?;
        let pck_chain_pem = if quote.cert_data_type == CERT_DATA_PCK_CHAIN {
            // The chain the quote carries is the one its QE vouched for; a chain in the
            // collateral is only for quotes that carry none (encrypted PPID).
            collateral.pck_certificate_chain = None;
            quote.cert_data.clone()
        } else {
            match &collateral.pck_certificate_chain {
                Some(chain) => chain.clone().into_bytes(),
                None => {
                    return Err(VerifyError::MissingEndorsement {
                        format,
                        what: format!("the PCK certificate chain (the quote carries certification data type {}, not a chain)", quote.cert_data_type),
                    })
                }
            }
        };
        let chains = [
            ("the PCK certificate chain", decode_chain(&pck_chain_pem, "the PCK certificate chain", format)?),
            ("the TCB Info issuer chain", decode_chain(collateral.tcb_info_issuer_chain.as_bytes(), "the TCB Info issuer chain", format)?),
            ("the QE Identity issuer chain", decode_chain(collateral.qe_identity_issuer_chain.as_bytes(), "the QE Identity issuer chain", format)?),
        ];
        let root = ChainCert::decode(root_der).map_err(|e| VerifyError::CertificateChain { format, why: format!("the pinned root does not parse: {e}") })?;

        // 3. Roots: a self-signed certificate in any chain must be the pinned root. And the
        // TCB Info and QE Identity must be signed by Intel's TCB Signing certificate, not by
        // any other leaf under the root (dcap-qvl 0.7.1 checks only that the signer is a
        // non-CA certificate issued directly by the root).
        for (_, chain) in &chains {
            for c in chain {
                let tbs = c.cert.tbs_certificate();
                if tbs.subject() == tbs.issuer() && c.der != root_der {
                    return Err(VerifyError::UntrustedRoot { format });
                }
            }
        }
        for (name, chain) in &chains[1..] {
            let cn = chain.first().and_then(ChainCert::common_name);
            if cn.as_deref() != Some(TCB_SIGNING_CN) {
                return Err(VerifyError::CertificateChain { format, why: format!("{name} starts with {cn:?}, not {TCB_SIGNING_CN:?}") });
            }
        }

        // 4. Time: every dated item must be valid at `now`.
        check_times(&collateral, &chains, &root, now_secs, format)?;

        // 5. Signatures, chains, CRLs, QE identity and TCB match: dcap-qvl. Debug-mode
        // quotes are let through so that the node policy, not this layer, refuses them.
        let verifier = QuoteVerifier::<CachedRingConfig>::new_with_config(root_der.to_vec()).allow_debug(true);
        let qvl = verifier.verify_with_policy(evidence, collateral.clone(), now_secs, &QuotePolicy::claims_only(now_secs)).map_err(|e| classify(&e, format))?;

        // 6. TCB Info must be for this platform's PCE, as Intel's QVL checks.
        let tcb_pce_id = serde_json::from_str::<TcbInfoHead>(&collateral.tcb_info).map_err(|e| malformed(format!("collateral tcb_info: {e}")))?.pce_id;
        let pck_pce_id = hex::encode_upper(&qvl.platform.pck.pce_id);
        if !tcb_pce_id.eq_ignore_ascii_case(&pck_pce_id) {
            return Err(VerifyError::MissingEndorsement {
                format,
                what: format!("TCB Info for PCE ID {pck_pce_id} (the collateral's is for PCE ID {tcb_pce_id})"),
            });
        }

        let pck_leaf = chains[0].1.first().ok_or_else(|| VerifyError::CertificateChain { format, why: "the PCK certificate chain is empty".into() })?;
        claims(&quote, &qvl, pck_leaf, format)
    }
}

impl Verifier for DcapVerifier {
    fn format(&self) -> Format {
        self.tee.format()
    }

    fn detect(&self, evidence: &[u8]) -> bool {
        detect_tee(evidence) == Some(self.tee)
    }

    fn verify(&self, evidence: &[u8], endorsements: &[Vec<u8>], now_secs: u64) -> Result<Claims, VerifyError> {
        self.verify_with_root(evidence, endorsements, now_secs, INTEL_SGX_ROOT_CA_DER)
    }
}

fn read_collateral(endorsements: &[Vec<u8>], format: Format) -> Result<QuoteCollateralV3, VerifyError> {
    let first = endorsements.first().ok_or_else(|| VerifyError::MissingEndorsement {
        format,
        what: "the DCAP collateral (QuoteCollateralV3 JSON: TCB Info, QE Identity, CRLs, issuer chains)".into(),
    })?;
    // The collateral is the first endorsement that parses; other endorsements are ignored.
    let collateral = match endorsements.iter().find_map(|e| serde_json::from_slice::<QuoteCollateralV3>(e).ok()) {
        Some(c) => c,
        None => {
            let why = serde_json::from_slice::<QuoteCollateralV3>(first).err().map_or_else(String::new, |e| e.to_string());
            return Err(VerifyError::Malformed { format, why: format!("collateral is not QuoteCollateralV3 JSON: {why}") });
        }
    };
    // pck_crl_issuer_chain is not needed: the PCK CRL's signature is checked with the key
    // of the PCK leaf's issuer, from the chain in the quote.
    let fields: [(&str, bool); 8] = [
        ("root_ca_crl", collateral.root_ca_crl.is_empty()),
        ("pck_crl", collateral.pck_crl.is_empty()),
        ("tcb_info_issuer_chain", collateral.tcb_info_issuer_chain.is_empty()),
        ("tcb_info", collateral.tcb_info.is_empty()),
        ("tcb_info_signature", collateral.tcb_info_signature.is_empty()),
        ("qe_identity_issuer_chain", collateral.qe_identity_issuer_chain.is_empty()),
        ("qe_identity", collateral.qe_identity.is_empty()),
        ("qe_identity_signature", collateral.qe_identity_signature.is_empty()),
    ];
    if let Some((name, _)) = fields.iter().find(|(_, empty)| *empty) {
        return Err(VerifyError::MissingEndorsement { format, what: format!("collateral field {name} is empty") });
    }
    Ok(collateral)
}

struct ChainCert {
    der: Vec<u8>,
    cert: x509_cert::Certificate,
}

impl ChainCert {
    fn decode(der: &[u8]) -> Result<ChainCert, String> {
        let cert = x509_cert::Certificate::from_der(der).map_err(|e| e.to_string())?;
        Ok(ChainCert { der: der.to_vec(), cert })
    }

    fn subject(&self) -> String {
        self.cert.tbs_certificate().subject().to_string()
    }

    fn common_name(&self) -> Option<String> {
        self.cert.tbs_certificate().subject().common_name().ok().flatten().map(String::from)
    }
}

fn decode_chain(pem_text: &[u8], name: &str, format: Format) -> Result<Vec<ChainCert>, VerifyError> {
    let bad = |why: String| VerifyError::CertificateChain { format, why: format!("{name}: {why}") };
    let blocks = pem::parse_many(pem_text).map_err(|e| bad(format!("not PEM: {e}")))?;
    if blocks.is_empty() {
        return Err(bad("no certificate".into()));
    }
    blocks
        .iter()
        .enumerate()
        .map(|(i, block)| {
            if block.tag() != "CERTIFICATE" {
                return Err(bad(format!("PEM block {i} is a {:?}, not a CERTIFICATE", block.tag())));
            }
            ChainCert::decode(block.contents()).map_err(|e| bad(format!("certificate {i} does not parse: {e}")))
        })
        .collect()
}

/// The head of a TCB Info or QE Identity JSON: the fields read before its signature is checked
/// (dcap-qvl checks the signature over the whole text).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DatedHead {
    issue_date: String,
    next_update: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TcbInfoHead {
    pce_id: String,
}

fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(|| format!("{secs} s after the epoch"), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn parse_rfc3339(value: &str) -> Option<u64> {
    chrono::DateTime::parse_from_rfc3339(value).ok().and_then(|t| u64::try_from(t.timestamp()).ok())
}

/// Stage 4. The bounds are those dcap-qvl and webpki apply (a CRL is stale from its
/// nextUpdate on; a JSON or certificate is valid through its last second), so this stage
/// mostly names the item that dcap-qvl would refuse anyway. It adds one check of its own:
/// a CRL whose thisUpdate is after `now` is refused too.
fn check_times(collateral: &QuoteCollateralV3, chains: &[(&str, Vec<ChainCert>); 3], root: &ChainCert, now: u64, format: Format) -> Result<(), VerifyError> {
    let stale = |what: String| VerifyError::NotValidAtTime { format, what };
    for (name, text) in [("the TCB Info", &collateral.tcb_info), ("the QE Identity", &collateral.qe_identity)] {
        let head: DatedHead = serde_json::from_str(text).map_err(|e| VerifyError::Malformed { format, why: format!("collateral: {name}: {e}") })?;
        let (Some(issued), Some(next)) = (parse_rfc3339(&head.issue_date), parse_rfc3339(&head.next_update)) else {
            return Err(VerifyError::Malformed { format, why: format!("collateral: {name}: issueDate/nextUpdate are not RFC 3339 times") });
        };
        if now < issued || now > next {
            return Err(stale(format!("{name} (issued {}, next update {})", rfc3339(issued), rfc3339(next))));
        }
    }
    for (name, der) in [("the root CA CRL", &collateral.root_ca_crl), ("the PCK CRL", &collateral.pck_crl)] {
        let crl = x509_cert::crl::CertificateList::<x509_cert::certificate::Rfc5280>::from_der(der)
            .map_err(|e| VerifyError::Malformed { format, why: format!("collateral: {name} does not parse: {e}") })?;
        let this_update = crl.tbs_cert_list.this_update.to_unix_duration().as_secs();
        let next_update = crl.tbs_cert_list.next_update.map(|t| t.to_unix_duration().as_secs());
        if now < this_update || next_update.is_some_and(|next| now >= next) {
            let next = next_update.map_or_else(|| "none".to_string(), rfc3339);
            return Err(stale(format!("{name} (this update {}, next update {next})", rfc3339(this_update))));
        }
    }
    let certs = chains.iter().flat_map(|(name, chain)| chain.iter().map(move |c| (*name, c))).chain(std::iter::once(("the pinned root", root)));
    for (name, c) in certs {
        let validity = c.cert.tbs_certificate().validity();
        let (not_before, not_after) = (validity.not_before.to_unix_duration().as_secs(), validity.not_after.to_unix_duration().as_secs());
        if now < not_before || now > not_after {
            return Err(stale(format!("certificate {:?} in {name} (valid {} to {})", c.subject(), rfc3339(not_before), rfc3339(not_after))));
        }
    }
    Ok(())
}

/// Stage 5: maps a dcap-qvl failure to the variant of the check that failed. dcap-qvl
/// 0.7.1 reports certificate-path failures as `webpki::Error` values (typed, matched here)
/// and every other failure as text; the text is matched against its messages in 0.7.1,
/// which `tests/dcap.rs` exercises. An unknown message stays an error (`Malformed`, with
/// dcap-qvl's words), never a pass.
fn classify(err: &anyhow::Error, format: Format) -> VerifyError {
    let outer = err.to_string();
    let all = format!("{err:#}");
    let has = |needles: &[&str]| needles.iter().any(|n| all.contains(n));

    if let Some(e) = err.downcast_ref::<webpki::Error>() {
        let crl = if outer.contains("root CA CRL") {
            Some("the root CA CRL")
        } else if outer.contains("PCK CRL") {
            Some("the PCK CRL")
        } else {
            None
        };
        return match e {
            webpki::Error::CertExpired { not_after, .. } => {
                VerifyError::NotValidAtTime { format, what: format!("a certificate in the chain (not after {})", rfc3339(not_after.as_secs())) }
            }
            webpki::Error::CertNotValidYet { not_before, .. } => {
                VerifyError::NotValidAtTime { format, what: format!("a certificate in the chain (not before {})", rfc3339(not_before.as_secs())) }
            }
            webpki::Error::CrlExpired { next_update, .. } => {
                VerifyError::NotValidAtTime { format, what: format!("a CRL (next update {})", rfc3339(next_update.as_secs())) }
            }
            webpki::Error::CertRevoked => VerifyError::Revoked { format, what: "a certificate in the chain (listed in the root CA or PCK CRL)".into() },
            webpki::Error::UnknownIssuer => VerifyError::UntrustedRoot { format },
            webpki::Error::InvalidCrlSignatureForPublicKey | webpki::Error::IssuerNotCrlSigner => {
                VerifyError::BadSignature { format, what: crl.unwrap_or("a CRL").to_string() + " (not signed by its issuer)" }
            }
            webpki::Error::UnknownRevocationStatus => {
                VerifyError::CertificateChain { format, why: "revocation status unknown: no CRL from the issuer of a certificate in the chain".into() }
            }
            _ => match crl {
                Some(name) => VerifyError::Malformed { format, why: format!("collateral: {name}: {all}") },
                None => VerifyError::CertificateChain { format, why: all },
            },
        };
    }

    if has(&["issue date is in the future", "TCBInfo expired", "QE Identity expired"]) {
        return VerifyError::NotValidAtTime { format, what: all };
    }
    if has(&["Signature is invalid for tcb_info"]) {
        return VerifyError::BadSignature { format, what: "the TCB Info (collateral)".into() };
    }
    if has(&["Signature is invalid for qe_identity"]) {
        return VerifyError::BadSignature { format, what: "the QE Identity (collateral)".into() };
    }
    if has(&["Signature is invalid for qe_report"]) {
        return VerifyError::BadSignature { format, what: "the QE report (by the PCK key)".into() };
    }
    if has(&["QE report hash mismatch"]) {
        return VerifyError::BadSignature { format, what: "the attestation key and QE authentication data (the QE report's hash over them)".into() };
    }
    if has(&["ISV enclave report signature is invalid"]) {
        return VerifyError::BadSignature { format, what: "the quote header and report body (by the attestation key)".into() };
    }
    if has(&["TCB status is invalid: Revoked"]) {
        return VerifyError::Revoked { format, what: "the platform TCB (TCB status Revoked)".into() };
    }
    if has(&["Fmspc mismatch", "with non-TDX TCB info", "with non-SGX TCB info", "Unsupported QE Identity id/version"]) {
        return VerifyError::MissingEndorsement { format, what: format!("collateral for this platform and TEE ({all})") };
    }
    if has(&[
        "Certificate chain is too short",
        "must be issued directly by the root CA",
        "Too many intermediate certificates",
        "Failed to parse PCK certificate",
        "Failed to parse TCB Info leaf certificate",
        "Failed to parse QE Identity leaf certificate",
        "Intel extension",
        "OID is missing",
        "length mismatch",
        "Failed to find",
        "Unexpected BOOLEAN",
        "Unexpected ENUMERATED",
        "DER recursion",
        "appears more than once",
    ]) {
        return VerifyError::CertificateChain { format, why: all };
    }
    if has(&[
        "QE MRSIGNER mismatch",
        "QE ISVPRODID mismatch",
        "QE MISCSELECT mismatch",
        "QE ATTRIBUTES mismatch",
        "QE report validation failed",
        "is below minimum",
        "No TCB levels found",
        "No matching TCB level found",
        "TDX module",
        "Unrecognized TCB status",
        "TEE_TCB_SVN2",
        "Failed to get TD10 report",
        "tdxModule",
        "tcbDate",
    ]) {
        return VerifyError::Tcb { format, status: all };
    }
    if has(&[
        "Debug mode is enabled",
        "TD profiling is enabled",
        "Reserved bits in TD attributes",
        "TD migration is enabled",
        "SERVTD_EXT is enabled",
        "SEPT_VE_DISABLE is not enabled",
        "Invalid MR service TD",
    ]) {
        return VerifyError::Tcb { format, status: format!("TD attributes refused: {all}") };
    }
    if has(&[
        "Failed to decode TcbInfo",
        "Failed to decode QeIdentity",
        "Failed to parse TCB Info",
        "Failed to parse QE Identity",
        "Failed to parse certs",
        "Failed to extract PCK certificates",
        "Failed to parse root CA CRL",
        "Failed to parse PCK CRL",
        "Failed to load root ca",
        "Failed to parse CRL",
        "CRL number",
        "RFC3339",
        "Failed to parse certificate for time window",
        // The raw r||s signatures in the quote are fixed-size; only the collateral's can be short.
        "Invalid key length",
    ]) {
        return VerifyError::Malformed { format, why: format!("collateral: {all}") };
    }
    VerifyError::Malformed { format, why: format!("quote refused by dcap-qvl: {all}") }
}

fn claims(quote: &DcapQuote, qvl: &QuoteClaims, pck_leaf: &ChainCert, format: Format) -> Result<Claims, VerifyError> {
    // Both parsers read the same signed bytes; a disagreement is a parser bug, refused.
    let (their_measurement, their_report_data): (&[u8], &[u8]) = match (&quote.body, qvl.report.as_td10(), qvl.report.as_sgx()) {
        (QuoteBody::Td(_), Some(td), _) => (&td.mr_td, &td.report_data),
        (QuoteBody::Sgx(_), _, Some(e)) => (&e.mr_enclave, &e.report_data),
        _ => (&[], &[]),
    };
    if their_measurement != quote.measurement() || their_report_data != quote.report_data() {
        return Err(VerifyError::Malformed { format, why: "this parser and dcap-qvl read different measurements or report data".into() });
    }

    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        f.insert(k.to_string(), v);
    };
    put("QUOTE_VERSION", quote.version.to_string());
    put("TEE_TYPE", if quote.tee == Tee::Tdx { "TDX" } else { "SGX" }.into());
    put("QE_SVN", quote.qe_svn.to_string());
    put("PCE_SVN", quote.pce_svn.to_string());
    put("USER_DATA", hex::encode(quote.user_data));
    match &quote.body {
        QuoteBody::Td(td) => {
            put("TD_REPORT_BODY_TYPE", td.body_type.to_string());
            put("TEE_TCB_SVN", hex::encode(td.tee_tcb_svn));
            put("MRSEAM", hex::encode(td.mr_seam));
            put("MRSIGNERSEAM", hex::encode(td.mr_signer_seam));
            put("SEAMATTRIBUTES", hex::encode(td.seam_attributes));
            put("TDATTRIBUTES", hex::encode(td.td_attributes));
            put("XFAM", hex::encode(td.xfam));
            put("MRTD", hex::encode(td.mr_td));
            put("MRCONFIGID", hex::encode(td.mr_config_id));
            put("MROWNER", hex::encode(td.mr_owner));
            put("MROWNERCONFIG", hex::encode(td.mr_owner_config));
            for (i, rtmr) in td.rtmr.iter().enumerate() {
                put(&format!("RTMR{i}"), hex::encode(rtmr));
            }
            if let Some(svn2) = td.tee_tcb_svn2 {
                put("TEE_TCB_SVN2", hex::encode(svn2));
            }
            if let Some(servtd) = td.mr_service_td {
                put("MRSERVICETD", hex::encode(servtd));
            }
        }
        QuoteBody::Sgx(e) => {
            put("CPUSVN", hex::encode(e.cpu_svn));
            put("MISCSELECT", format!("{:08x}", e.misc_select));
            put("ATTRIBUTES", hex::encode(e.attributes));
            put("MRENCLAVE", hex::encode(e.mr_enclave));
            put("MRSIGNER", hex::encode(e.mr_signer));
            put("ISVPRODID", e.isv_prod_id.to_string());
            put("ISVSVN", e.isv_svn.to_string());
        }
    }
    let advisories = qvl.tcb.advisory_ids.join(",");
    put("TCB_STATUS", qvl.tcb.status.to_string());
    put("ADVISORY_IDS", advisories.clone());
    put("TCB_EVALUATION_DATA_NUMBER", qvl.tcb.eval_data_number.to_string());
    put("PLATFORM_TCB_STATUS", qvl.platform.tcb_level.tcb_status.to_string());
    put("PLATFORM_TCB_DATE", qvl.platform.tcb_level.tcb_date.clone());
    put("PLATFORM_ADVISORY_IDS", qvl.platform.tcb_level.advisory_ids.join(","));
    if let Some(current) = &qvl.platform.current_tcb_level {
        put("CURRENT_TCB_STATUS", current.tcb_status.to_string());
    }
    put("QE_IDENTITY_STATUS", qvl.qe.tcb_level.tcb_status.to_string());
    put("QE_TCB_DATE", qvl.qe.tcb_level.tcb_date.clone());
    put("QE_ADVISORY_IDS", qvl.qe.tcb_level.advisory_ids.join(","));
    put("QE_MRSIGNER", hex::encode(quote.qe_report.mr_signer));
    put("QE_ISVPRODID", quote.qe_report.isv_prod_id.to_string());
    put("QE_ISVSVN", quote.qe_report.isv_svn.to_string());
    let pck = &qvl.platform.pck;
    let subject = pck_leaf.subject();
    let fmspc = hex::encode_upper(pck.fmspc);
    put("PCK_SUBJECT", subject.clone());
    put("PCK_ISSUER", pck_leaf.cert.tbs_certificate().issuer().to_string());
    put("FMSPC", fmspc.clone());
    put("PCE_ID", hex::encode_upper(&pck.pce_id));
    put("PCK_CPUSVN", hex::encode(pck.cpu_svn));
    put("PCK_PCESVN", pck.pce_svn.to_string());
    put("SGX_TYPE", pck.sgx_type.to_string());
    put("PPID", hex::encode(&pck.ppid));
    put("COLLATERAL_EARLIEST_ISSUE", rfc3339(qvl.earliest_issue_date));
    put("COLLATERAL_EXPIRES", rfc3339(qvl.earliest_expiration_date));

    let tcb = if advisories.is_empty() { qvl.tcb.status.to_string() } else { format!("{} ({advisories})", qvl.tcb.status) };
    Ok(Claims {
        format,
        measurement: hex::encode(quote.measurement()),
        report_data: hex::encode(quote.report_data()),
        debug: quote.debug(),
        // DCAP quotes carry no time; freshness comes from a nonce in the report data.
        issued_at: None,
        tcb: Some(tcb),
        signer: Some(format!("PCK {subject} (FMSPC {fmspc})")),
        fields: f,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_signature_cache_remembers_only_exact_successes() {
        use rustls_pki_types::SignatureVerificationAlgorithm;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let public = ring::signature::KeyPair::public_key(&key).as_ref().to_vec();
        let sig = key.sign(&rng, b"message").unwrap().as_ref().to_vec();
        let cache = SignatureCache { verified: std::sync::Mutex::new(None) };
        assert!(cache.verify_signature(&public, b"message", &sig).is_ok());
        assert!(cache.verify_signature(&public, b"message", &sig).is_ok(), "a hit");
        assert!(cache.verify_signature(&public, b"massage", &sig).is_err(), "another message");
        let mut bad = sig.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(cache.verify_signature(&public, b"message", &bad).is_err(), "another signature");
        let mut other_key = public.clone();
        other_key[10] ^= 1;
        assert!(cache.verify_signature(&other_key, b"message", &sig).is_err(), "another key");
        assert_eq!(cache.verified.lock().unwrap().as_ref().map(|s| s.len()), Some(1), "failures are not remembered");
    }

    use super::*;

    const TDX_V4_QUOTE: &[u8] = include_bytes!("../tests/vectors/tdx-sgx-dcap/tdx-v4-uptodate/quote.bin");
    const TDX_V4_COLLATERAL: &[u8] = include_bytes!("../tests/vectors/tdx-sgx-dcap/tdx-v4-uptodate/collateral.json");
    /// 2025-07-01T00:00:00Z, inside the tdx-v4-uptodate collateral's window.
    const JULY_2025: u64 = 1_751_328_000;

    #[test]
    fn pinned_root_passes() {
        let claims = DcapVerifier::tdx().verify_with_root(TDX_V4_QUOTE, &[TDX_V4_COLLATERAL.to_vec()], JULY_2025, INTEL_SGX_ROOT_CA_DER).unwrap();
        assert_eq!(claims.tcb.as_deref(), Some("UpToDate"));
    }

    #[test]
    fn another_pinned_root_is_untrusted() {
        // The same certificate with one bit of its public key changed: another key under
        // Intel's name. The chains in the quote and the collateral end at Intel's real root,
        // which is now not the pinned one.
        let mut root = INTEL_SGX_ROOT_CA_DER.to_vec();
        let key_at = root.windows(2).position(|w| w == [0x03, 0x42]).unwrap() + 10;
        root[key_at] ^= 0x01;
        let err = DcapVerifier::tdx().verify_with_root(TDX_V4_QUOTE, &[TDX_V4_COLLATERAL.to_vec()], JULY_2025, &root).unwrap_err();
        assert_eq!(err, VerifyError::UntrustedRoot { format: Format::Tdx });
    }

    #[test]
    fn dcap_qvl_failures_map_to_the_failing_check() {
        use anyhow::Context;
        let chain = |e: webpki::Error| Err::<(), _>(anyhow::Error::msg(e)).context("Failed to verify certificate chain").unwrap_err();
        let f = Format::Tdx;
        // Shapes that the real vectors cannot reach: a revoked certificate, a revoked TCB.
        assert!(matches!(classify(&chain(webpki::Error::CertRevoked), f), VerifyError::Revoked { .. }));
        assert!(matches!(classify(&anyhow::anyhow!("TCB status is invalid: Revoked"), f), VerifyError::Revoked { .. }));
        assert_eq!(classify(&chain(webpki::Error::UnknownIssuer), f), VerifyError::UntrustedRoot { format: f });
        // As dcap-qvl 0.7.1 raises them: the root's own CRL check has no context.
        let t = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(1));
        let crl_expired = anyhow::Error::msg(webpki::Error::CrlExpired { time: t, next_update: t });
        assert!(matches!(classify(&crl_expired, f), VerifyError::NotValidAtTime { .. }));
        assert!(matches!(classify(&chain(webpki::Error::CertExpired { time: t, not_after: t }), f), VerifyError::NotValidAtTime { .. }));
        assert!(matches!(classify(&anyhow::anyhow!("TDX module MRSIGNER mismatch"), f), VerifyError::Tcb { .. }));
        assert!(matches!(classify(&anyhow::anyhow!("SEPT_VE_DISABLE is not enabled"), f), VerifyError::Tcb { .. }));
        // An unknown failure stays a failure.
        assert!(matches!(classify(&anyhow::anyhow!("something new"), f), VerifyError::Malformed { .. }));
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert!(r.array::<4>("x").is_err());
        assert_eq!(r.u16("y").unwrap(), 0x0201);
        assert!(r.u16("z").is_err());
        assert!(r.take(usize::MAX, "w").is_err());
        assert_eq!(r.rest(), &[3]);
    }
}
