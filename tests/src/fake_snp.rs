//! An SEV-SNP guest's configfs-tsm, in memory, for running the real server against
//! "hardware" evidence: the kernel side of the ABI (entries, `generation`, `inblob`,
//! `outblob`, `auxblob`) in front of a fake AMD Secure Processor that signs genuine
//! SNP report layouts with a TEST-ONLY VCEK (`tests/data/snp-test-pki`, made by its
//! `make.sh`). Verifiers that pin AMD's roots reject these reports; tests that trust
//! [`TEST_ARK`] accept them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ring::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use tessera_enclave::tsm::{ConfigFs, ARK_GUID, ASK_GUID, VCEK_GUID};

/// The test chain: ARK (self-signed), ASK, VCEK; DER.
pub const TEST_ARK: &[u8] = include_bytes!("../data/snp-test-pki/ark.der");
pub const TEST_ASK: &[u8] = include_bytes!("../data/snp-test-pki/ask.der");
pub const TEST_VCEK: &[u8] = include_bytes!("../data/snp-test-pki/vcek.der");
/// CRLs the test ARK signed: empty, revoking the test ASK, and one whose nextUpdate
/// (2026-02-01) has passed.
pub const TEST_CRL_EMPTY: &[u8] = include_bytes!("../data/snp-test-pki/crl-empty.der");
pub const TEST_CRL_REVOKING_ASK: &[u8] = include_bytes!("../data/snp-test-pki/crl-revoking-ask.der");
pub const TEST_CRL_EXPIRED: &[u8] = include_bytes!("../data/snp-test-pki/crl-expired.der");
const TEST_VCEK_KEY: &[u8] = include_bytes!("../data/snp-test-pki/vcek.pk8");
/// A real Milan report (v2) as the layout template: its CHIP_ID and REPORTED_TCB are
/// the ones the test VCEK certifies.
const TEMPLATE: &[u8] = include_bytes!("../../attestation/tests/vectors/sev-snp/milan-virtee/report.bin");

const REPORT_DATA: usize = 0x50;
const MEASUREMENT: usize = 0x90;
const POLICY: usize = 0x08;
const VMPL: usize = 0x30;
const SIGNED_LEN: usize = 0x2A0;

/// The fake guest's configfs-tsm and Secure Processor.
pub struct FakeSnpGuest {
    measurement: [u8; 48],
    debug: bool,
    /// The VMPL the reports come from, and extra guest-policy bits.
    vmpl: u32,
    policy_bits: u64,
    key: EcdsaKeyPair,
    files: Mutex<BTreeMap<PathBuf, Vec<u8>>>,
    reports: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for FakeSnpGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FakeSnpGuest(measurement {})", hex::encode(self.measurement))
    }
}

impl FakeSnpGuest {
    /// A guest launched with `measurement`; `debug` sets the policy's DEBUG bit.
    pub fn new(measurement: [u8; 48], debug: bool) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, TEST_VCEK_KEY, &rng).expect("the committed test VCEK key parses");
        FakeSnpGuest { measurement, debug, vmpl: 0, policy_bits: 0, key, files: Mutex::new(BTreeMap::new()), reports: Default::default() }
    }

    /// Reports requested from `vmpl` (as code beside an SVSM or paravisor would get).
    pub fn at_vmpl(mut self, vmpl: u32) -> Self {
        self.vmpl = vmpl;
        self
    }

    /// Guest-policy bits set at launch besides the template's (e.g. MIGRATE_MA, 1 << 18).
    pub fn with_policy_bits(mut self, bits: u64) -> Self {
        self.policy_bits = bits;
        self
    }

    /// How many reports the Secure Processor signed.
    pub fn reports_signed(&self) -> u64 {
        self.reports.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An SNP attestation report over `report_data`, signed by the test VCEK.
    pub fn report(&self, report_data: &[u8]) -> std::io::Result<Vec<u8>> {
        if report_data.len() != 64 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "inblob must be 64 bytes"));
        }
        let mut r = TEMPLATE.to_vec();
        r[REPORT_DATA..REPORT_DATA + 64].copy_from_slice(report_data);
        r[MEASUREMENT..MEASUREMENT + 48].copy_from_slice(&self.measurement);
        let mut policy = u64::from_le_bytes(r[POLICY..POLICY + 8].try_into().unwrap_or_default());
        policy = if self.debug { policy | 1 << 19 } else { policy & !(1 << 19) };
        policy |= self.policy_bits;
        r[POLICY..POLICY + 8].copy_from_slice(&policy.to_le_bytes());
        r[VMPL..VMPL + 4].copy_from_slice(&self.vmpl.to_le_bytes());
        let sig = self.key.sign(&ring::rand::SystemRandom::new(), &r[..SIGNED_LEN]).map_err(|_| std::io::Error::other("signing failed"))?;
        // r and s, big-endian 48 bytes each from ring, go in as 72-byte little-endian fields.
        let (sr, ss) = sig.as_ref().split_at(48);
        r[SIGNED_LEN..SIGNED_LEN + 144].fill(0);
        for (i, b) in sr.iter().rev().enumerate() {
            r[SIGNED_LEN + i] = *b;
        }
        for (i, b) in ss.iter().rev().enumerate() {
            r[SIGNED_LEN + 72 + i] = *b;
        }
        self.reports.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(r)
    }

    /// The extended-report certificate table the host hands the guest (`auxblob`).
    pub fn cert_table() -> Vec<u8> {
        let certs = [(VCEK_GUID, TEST_VCEK), (ASK_GUID, TEST_ASK), (ARK_GUID, TEST_ARK)];
        let mut offset = (certs.len() + 1) * 24;
        let mut table = Vec::new();
        for (guid, cert) in certs {
            table.extend_from_slice(&guid);
            table.extend_from_slice(&(offset as u32).to_le_bytes());
            table.extend_from_slice(&(cert.len() as u32).to_le_bytes());
            offset += cert.len();
        }
        table.extend_from_slice(&[0; 24]);
        for (_, cert) in certs {
            table.extend_from_slice(cert);
        }
        table
    }
}

fn lock(files: &Mutex<BTreeMap<PathBuf, Vec<u8>>>) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Vec<u8>>> {
    files.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ConfigFs for FakeSnpGuest {
    fn mkdir(&self, path: &Path) -> std::io::Result<()> {
        let mut f = lock(&self.files);
        if f.contains_key(path) {
            return Err(std::io::ErrorKind::AlreadyExists.into());
        }
        f.insert(path.to_path_buf(), Vec::new());
        f.insert(path.join("provider"), b"sev_guest\n".to_vec());
        f.insert(path.join("generation"), b"0\n".to_vec());
        Ok(())
    }

    fn rmdir(&self, path: &Path) -> std::io::Result<()> {
        lock(&self.files).retain(|p, _| !p.starts_with(path));
        Ok(())
    }

    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        let f = lock(&self.files);
        if !f.contains_key(path.parent().unwrap_or(path)) {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        match path.file_name().and_then(|n| n.to_str()) {
            Some("outblob") => {
                let inblob = f.get(&path.with_file_name("inblob")).ok_or(std::io::ErrorKind::InvalidInput)?.clone();
                drop(f);
                self.report(&inblob)
            }
            Some("auxblob") => Ok(Self::cert_table()),
            _ => f.get(path).cloned().ok_or_else(|| std::io::ErrorKind::NotFound.into()),
        }
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let mut f = lock(&self.files);
        let generation = path.with_file_name("generation");
        let g: u64 = String::from_utf8_lossy(f.get(&generation).ok_or(std::io::ErrorKind::NotFound)?).trim().parse().map_err(std::io::Error::other)?;
        f.insert(generation, format!("{}\n", g + 1).into_bytes());
        f.insert(path.to_path_buf(), bytes.to_vec());
        Ok(())
    }
}
