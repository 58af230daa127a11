//! Evidence from Linux configfs-tsm (`/sys/kernel/config/tsm/report`), the kernel's
//! common interface for SEV-SNP (`sev_guest`) and TDX (`tdx_guest`) guests
//! (Documentation/ABI/testing/configfs-tsm):
//!
//! 1. `mkdir report/$name`; the kernel fills it with attribute files;
//! 2. write 64 bytes of report data to `inblob`;
//! 3. read `outblob` (the SNP report or the TDX quote) and, for SNP, `auxblob` (the
//!    certificate table from the host: VCEK, ASK, ARK);
//! 4. `generation` counts writes to the entry: it must have advanced by exactly one, or
//!    another process wrote to the same entry between our write and our read;
//! 5. `rmdir` the entry.
//!
//! The same code runs in a real guest. Tests drive it through [`ConfigFs`] with a fake
//! that implements the kernel side of that ABI.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::bundle::EvidenceBundle;
use crate::{AttestError, Attester, Format};

pub const DEFAULT_ROOT: &str = "/sys/kernel/config/tsm/report";

/// The few filesystem operations the ABI needs.
pub trait ConfigFs: Send + Sync {
    fn mkdir(&self, path: &Path) -> std::io::Result<()>;
    fn rmdir(&self, path: &Path) -> std::io::Result<()>;
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
}

/// The real filesystem.
#[derive(Debug)]
pub struct StdFs;

impl ConfigFs for StdFs {
    fn mkdir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir(path)
    }
    fn rmdir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::write(path, bytes)
    }
}

pub struct TsmAttester<F: ConfigFs = StdFs> {
    fs: F,
    root: PathBuf,
    format: Format,
    counter: AtomicU64,
    /// Files the operator supplies for verifiers (see [`TsmAttester::with_endorsement_files`]).
    endorsement_files: Vec<PathBuf>,
}

impl<F: ConfigFs> std::fmt::Debug for TsmAttester<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TsmAttester({}, {:?})", self.root.display(), self.format)
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> AttestError {
    AttestError::Interface(format!("{what} {}: {e}", path.display()))
}

/// Removes the report entry however `attest` ends.
struct Entry<'a, F: ConfigFs> {
    fs: &'a F,
    path: PathBuf,
}

impl<F: ConfigFs> Drop for Entry<'_, F> {
    fn drop(&mut self) {
        let _ = self.fs.rmdir(&self.path);
    }
}

impl TsmAttester<StdFs> {
    /// Opens the kernel's interface at [`DEFAULT_ROOT`] (or `root`).
    pub fn open(root: &Path) -> Result<Self, AttestError> {
        Self::with_fs(StdFs, root)
    }
}

impl<F: ConfigFs> TsmAttester<F> {
    /// Probes the provider by creating (and removing) one entry.
    pub fn with_fs(fs: F, root: &Path) -> Result<Self, AttestError> {
        let probe = root.join(format!("tessera-probe-{}", std::process::id()));
        fs.mkdir(&probe).map_err(|e| AttestError::Unavailable(format!("configfs-tsm at {} is not usable: {e}", root.display())))?;
        let provider = fs.read(&probe.join("provider"));
        let _ = fs.rmdir(&probe);
        let provider = provider.map_err(|e| io("reading the provider of", root, e))?;
        let format = match String::from_utf8_lossy(&provider).trim() {
            "sev_guest" => Format::SevSnp,
            "tdx_guest" => Format::Tdx,
            other => return Err(AttestError::Unavailable(format!("configfs-tsm provider {other:?} is not supported"))),
        };
        Ok(TsmAttester { fs, root: root.to_path_buf(), format, counter: AtomicU64::new(0), endorsement_files: Vec::new() })
    }

    /// Files that travel with every piece of evidence, for verifiers that cannot fetch
    /// them: for SEV-SNP when the host provides no certificate table, the VCEK (DER) and
    /// the ASK/ARK chain (PEM); for TDX, the DCAP collateral (JSON). They are read at each
    /// attestation, so a refreshed collateral file is picked up without a restart.
    pub fn with_endorsement_files(mut self, files: Vec<PathBuf>) -> Self {
        self.endorsement_files = files;
        self
    }

    fn endorsement_files(&self) -> Result<Vec<Vec<u8>>, AttestError> {
        self.endorsement_files
            .iter()
            .map(|p| std::fs::read(p).map_err(|e| AttestError::Unavailable(format!("endorsement file {}: {e}", p.display()))))
            .collect()
    }

    fn read_generation(&self, entry: &Path) -> Result<u64, AttestError> {
        let path = entry.join("generation");
        let text = self.fs.read(&path).map_err(|e| io("reading", &path, e))?;
        String::from_utf8_lossy(&text).trim().parse().map_err(|_| AttestError::Interface(format!("{} is not a number", path.display())))
    }
}

impl<F: ConfigFs> Attester for TsmAttester<F> {
    fn format(&self) -> Format {
        self.format
    }

    fn attest(&self, report_data: &[u8; 64], _now_secs: u64) -> Result<Vec<u8>, AttestError> {
        let name = format!("tessera-{}-{}", std::process::id(), self.counter.fetch_add(1, Ordering::Relaxed));
        let path = self.root.join(name);
        self.fs.mkdir(&path).map_err(|e| io("creating", &path, e))?;
        let entry = Entry { fs: &self.fs, path };
        let before = self.read_generation(&entry.path)?;
        let inblob = entry.path.join("inblob");
        self.fs.write(&inblob, report_data).map_err(|e| io("writing", &inblob, e))?;
        let outblob = entry.path.join("outblob");
        let evidence = self.fs.read(&outblob).map_err(|e| io("reading", &outblob, e))?;
        let after = self.read_generation(&entry.path)?;
        if after != before + 1 {
            return Err(AttestError::Interface(format!(
                "another writer used the report entry (generation {before} → {after}); the evidence may not carry our report data"
            )));
        }
        if evidence.is_empty() {
            return Err(AttestError::Interface("the kernel returned empty evidence".into()));
        }
        let mut endorsements = Vec::new();
        if self.format == Format::SevSnp {
            let auxblob = match self.fs.read(&entry.path.join("auxblob")) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(io("reading", &entry.path.join("auxblob"), e)),
            };
            // Without certificates from the host (or from the operator's files) verifiers
            // must fetch the VCEK themselves.
            if !auxblob.is_empty() {
                endorsements = parse_snp_cert_table(&auxblob)?;
            }
        }
        endorsements.extend(self.endorsement_files()?);
        if endorsements.is_empty() {
            return Ok(evidence);
        }
        Ok(EvidenceBundle { evidence, endorsements }.encode())
    }
}

/// GUIDs of the SNP extended-report certificate table (SEV-SNP GHCB spec, Table 11),
/// in the byte order the table stores them.
pub const VCEK_GUID: [u8; 16] = guid("63da758d-e664-4564-adc5-f4b93be8accd");
pub const VLEK_GUID: [u8; 16] = guid("a8074bc2-a25a-483e-aae6-39c045a0b8a1");
pub const ASK_GUID: [u8; 16] = guid("4ab7b379-bbac-4fe4-a02f-05aef327c782");
pub const ARK_GUID: [u8; 16] = guid("c0b406a4-a803-4952-9743-3fb6014cd0ae");

/// Parses a textual GUID into its mixed-endian 16-byte form (as in the table).
const fn guid(s: &str) -> [u8; 16] {
    let b = s.as_bytes();
    let mut hexes = [0u8; 32];
    let (mut i, mut j) = (0, 0);
    while i < b.len() {
        if b[i] != b'-' {
            hexes[j] = match b[i] {
                b'0'..=b'9' => b[i] - b'0',
                b'a'..=b'f' => b[i] - b'a' + 10,
                _ => b[i] - b'A' + 10,
            };
            j += 1;
        }
        i += 1;
    }
    let mut raw = [0u8; 16];
    let mut k = 0;
    while k < 16 {
        raw[k] = hexes[2 * k] << 4 | hexes[2 * k + 1];
        k += 1;
    }
    // time_low, time_mid, time_hi are little-endian in the table.
    [raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6], raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]]
}

/// Splits the certificate table into DER certificates: entries of (GUID, offset u32,
/// length u32) ended by an all-zero entry; offsets count from the table's start.
pub fn parse_snp_cert_table(table: &[u8]) -> Result<Vec<Vec<u8>>, AttestError> {
    let bad = |why: &str| AttestError::Interface(format!("SNP certificate table: {why}"));
    let mut certs = Vec::new();
    for i in 0.. {
        let at = i * 24;
        let entry = table.get(at..at + 24).ok_or_else(|| bad("not terminated by an all-zero entry"))?;
        if entry.iter().all(|&b| b == 0) {
            return Ok(certs);
        }
        let offset = u32::from_le_bytes([entry[16], entry[17], entry[18], entry[19]]) as usize;
        let len = u32::from_le_bytes([entry[20], entry[21], entry[22], entry[23]]) as usize;
        let cert = table.get(offset..offset.saturating_add(len)).ok_or_else(|| bad("an entry points outside the table"))?;
        if [VCEK_GUID, VLEK_GUID, ASK_GUID, ARK_GUID].iter().any(|g| g[..] == entry[..16]) {
            certs.push(cert.to_vec());
        }
    }
    Err(bad("too many entries"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    /// The kernel side of configfs-tsm, in memory: entries get attribute files on mkdir,
    /// writing inblob bumps the generation, reading outblob returns a report derived from
    /// inblob. `intruder` simulates another process writing to our entry.
    struct FakeKernel {
        provider: &'static str,
        files: Mutex<BTreeMap<PathBuf, Vec<u8>>>,
        intruder: bool,
        aux: Vec<u8>,
    }

    impl FakeKernel {
        fn new(provider: &'static str) -> Self {
            FakeKernel { provider, files: Mutex::new(BTreeMap::new()), intruder: false, aux: Vec::new() }
        }
    }

    impl ConfigFs for FakeKernel {
        fn mkdir(&self, path: &Path) -> std::io::Result<()> {
            let mut f = self.files.lock().unwrap();
            if f.contains_key(path) {
                return Err(std::io::ErrorKind::AlreadyExists.into());
            }
            f.insert(path.to_path_buf(), Vec::new());
            f.insert(path.join("provider"), format!("{}\n", self.provider).into_bytes());
            f.insert(path.join("generation"), b"0\n".to_vec());
            if !self.aux.is_empty() {
                f.insert(path.join("auxblob"), self.aux.clone());
            }
            Ok(())
        }
        fn rmdir(&self, path: &Path) -> std::io::Result<()> {
            self.files.lock().unwrap().retain(|p, _| !p.starts_with(path));
            Ok(())
        }
        fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
            let f = self.files.lock().unwrap();
            if path.ends_with("outblob") {
                let inblob = f.get(&path.with_file_name("inblob")).ok_or(std::io::ErrorKind::InvalidInput)?;
                let mut report = b"REPORT:".to_vec();
                report.extend_from_slice(inblob);
                return Ok(report);
            }
            f.get(path).cloned().ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
            let mut f = self.files.lock().unwrap();
            let genpath = path.with_file_name("generation");
            let bump = if self.intruder { 2 } else { 1 };
            let g: u64 = String::from_utf8_lossy(f.get(&genpath).ok_or(std::io::ErrorKind::NotFound)?).trim().parse().unwrap();
            f.insert(genpath, format!("{}\n", g + bump).into_bytes());
            f.insert(path.to_path_buf(), bytes.to_vec());
            Ok(())
        }
    }

    fn root() -> PathBuf {
        PathBuf::from(DEFAULT_ROOT)
    }

    #[test]
    fn tdx_quote_carries_our_report_data_and_the_entry_is_removed() {
        let a = TsmAttester::with_fs(FakeKernel::new("tdx_guest"), &root()).unwrap();
        assert_eq!(a.format(), Format::Tdx);
        let ev = a.attest(&[7; 64], 0).unwrap();
        assert_eq!(&ev[..7], b"REPORT:");
        assert_eq!(&ev[7..], &[7; 64]);
        assert!(a.fs.files.lock().unwrap().is_empty(), "entries are removed");
    }

    #[test]
    fn snp_certificates_from_auxblob_travel_in_a_bundle() {
        let (vcek, ask) = (b"vcek-der".to_vec(), b"ask-der".to_vec());
        let mut table = Vec::new();
        let header = 3 * 24;
        for (g, off, cert) in [(VCEK_GUID, header, &vcek), (ASK_GUID, header + vcek.len(), &ask)] {
            table.extend_from_slice(&g);
            table.extend_from_slice(&(off as u32).to_le_bytes());
            table.extend_from_slice(&(cert.len() as u32).to_le_bytes());
        }
        table.extend_from_slice(&[0; 24]);
        table.extend_from_slice(&vcek);
        table.extend_from_slice(&ask);
        let mut k = FakeKernel::new("sev_guest");
        k.aux = table;
        let a = TsmAttester::with_fs(k, &root()).unwrap();
        let bundle = EvidenceBundle::decode(&a.attest(&[9; 64], 0).unwrap()).unwrap();
        assert_eq!(&bundle.evidence[7..], &[9; 64]);
        assert_eq!(bundle.endorsements, vec![vcek, ask]);
    }

    #[test]
    fn operator_endorsement_files_travel_with_the_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let collateral = dir.path().join("collateral.json");
        std::fs::write(&collateral, b"{\"tcb_info\":1}").unwrap();
        let a = TsmAttester::with_fs(FakeKernel::new("tdx_guest"), &root()).unwrap().with_endorsement_files(vec![collateral.clone()]);
        let bundle = EvidenceBundle::decode(&a.attest(&[3; 64], 0).unwrap()).unwrap();
        assert_eq!(&bundle.evidence[7..], &[3; 64]);
        assert_eq!(bundle.endorsements, vec![b"{\"tcb_info\":1}".to_vec()]);
        // Refreshed on disk, picked up by the next report.
        std::fs::write(&collateral, b"{\"tcb_info\":2}").unwrap();
        assert_eq!(EvidenceBundle::decode(&a.attest(&[3; 64], 0).unwrap()).unwrap().endorsements[0], b"{\"tcb_info\":2}");
        // A missing file fails the attestation by name, never evidence without it.
        std::fs::remove_file(&collateral).unwrap();
        let err = a.attest(&[3; 64], 0).unwrap_err().to_string();
        assert!(err.contains("collateral.json"), "{err}");
    }

    #[test]
    fn a_concurrent_writer_is_detected() {
        let mut k = FakeKernel::new("sev_guest");
        k.intruder = true;
        let a = TsmAttester::with_fs(k, &root()).unwrap();
        let err = a.attest(&[1; 64], 0).unwrap_err().to_string();
        assert!(err.contains("another writer"), "{err}");
        assert!(a.fs.files.lock().unwrap().is_empty(), "entry removed on error too");
    }

    #[test]
    fn unknown_provider_and_missing_interface_are_unavailable() {
        assert!(matches!(TsmAttester::with_fs(FakeKernel::new("arm_cca_guest"), &root()), Err(AttestError::Unavailable(_))));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(TsmAttester::open(&dir.path().join("missing")), Err(AttestError::Unavailable(_))));
    }

    #[test]
    fn malformed_certificate_tables_are_refused() {
        assert!(parse_snp_cert_table(&[1; 10]).is_err());
        let mut t = VCEK_GUID.to_vec();
        t.extend_from_slice(&1000u32.to_le_bytes());
        t.extend_from_slice(&10u32.to_le_bytes());
        t.extend_from_slice(&[0; 24]);
        assert!(parse_snp_cert_table(&t).is_err());
    }

    #[test]
    fn guid_byte_order_matches_the_spec() {
        // 63da758d-e664-4564-adc5-f4b93be8accd stored mixed-endian.
        assert_eq!(VCEK_GUID[..4], [0x8d, 0x75, 0xda, 0x63]);
        assert_eq!(VCEK_GUID[4..8], [0x64, 0xe6, 0x64, 0x45]);
        assert_eq!(VCEK_GUID[8..], [0xad, 0xc5, 0xf4, 0xb9, 0x3b, 0xe8, 0xac, 0xcd]);
    }
}
