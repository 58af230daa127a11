//! Sealing: AES-256-GCM under a key only the enclave holds. Where the key comes from:
//!
//! - on SEV-SNP, the firmware's key-derivation request, bound to the launch measurement
//!   and the chip ([`crate::sev_guest`]);
//! - a key provisioned into the guest's memory by the operator's key broker after it
//!   verified the guest's evidence ([`SealingKey::from_provisioned_file`]); TDX has no
//!   firmware sealing key, so a TDX guest needs this;
//! - in dev mode, a file on the host's disk, which protects nothing, and every load of
//!   it says so.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

pub struct SealingKey {
    key: Zeroizing<[u8; 32]>,
    insecure: bool,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealingKey {{ insecure: {}, key: <redacted> }}", self.insecure)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed blob does not authenticate")]
    Authentication,
    #[error("sealed blob is shorter than its nonce")]
    Truncated,
    #[error("dev sealing key file {path}: {why}")]
    KeyFile { path: String, why: String },
    #[error("provisioned sealing key {path}: {why}")]
    Provisioned { path: String, why: String },
    #[error("hardware sealing key: {0}")]
    Hardware(String),
}

impl SealingKey {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self::from_zeroizing(Zeroizing::new(key))
    }

    /// Takes a key that is already in a zeroizing buffer, without a copy on the stack.
    pub fn from_zeroizing(key: Zeroizing<[u8; 32]>) -> Self {
        SealingKey { key, insecure: false }
    }

    /// INSECURE dev mode: reads the key from `path`, creating it (mode 0600) if absent.
    pub fn load_or_create_dev(path: &Path) -> Result<Self, SealError> {
        let err = |why: String| SealError::KeyFile { path: path.display().to_string(), why };
        let key = match std::fs::read(path) {
            Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| err(format!("holds {} bytes, expected 32", bytes.len())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut k);
                tessera_attestation::keyfile::write_private(path, &k, false).map_err(|e| err(e.to_string()))?;
                k
            }
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(SealingKey { key: Zeroizing::new(key), insecure: true })
    }

    /// A key the operator's key broker wrote into the guest (a tmpfs inside the
    /// confidential VM) after verifying the guest's evidence: 32 raw bytes or 64 hex
    /// digits. The file must be readable by its owner only.
    pub fn from_provisioned_file(path: &Path) -> Result<Self, SealError> {
        let err = |why: String| SealError::Provisioned { path: path.display().to_string(), why };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(err(format!("mode {mode:o} lets others read it; it must be 0600 or stricter")));
            }
        }
        let _ = meta;
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
        let mut key = Zeroizing::new([0u8; 32]);
        if bytes.len() == 32 {
            key.copy_from_slice(&bytes);
        } else {
            let malformed = || err(format!("holds {} bytes: expected 32 raw bytes or 64 hex digits", bytes.len()));
            let text = std::str::from_utf8(&bytes).map_err(|_| malformed())?;
            hex::decode_to_slice(text.trim(), key.as_mut_slice()).map_err(|_| malformed())?;
        }
        if key.iter().all(|&b| b == 0) {
            return Err(err("is all zeros".into()));
        }
        Ok(SealingKey { key, insecure: false })
    }

    pub fn is_insecure(&self) -> bool {
        self.insecure
    }

    /// nonce (12 random bytes) ‖ ciphertext ‖ tag; `aad` names what is sealed.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let cipher = Aes256Gcm::new(self.key.as_ref().into());
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .unwrap_or_else(|_| unreachable!("AES-GCM encryption of an in-memory buffer cannot fail"));
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        out
    }

    pub fn unseal(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.len() < 12 {
            return Err(SealError::Truncated);
        }
        let (nonce, ct) = sealed.split_at(12);
        Aes256Gcm::new(self.key.as_ref().into())
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| SealError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper() {
        let k = SealingKey::from_bytes([4; 32]);
        let s = k.seal(b"a", b"secret");
        assert_eq!(&*k.unseal(b"a", &s).unwrap(), b"secret");
        assert!(k.unseal(b"b", &s).is_err(), "aad binds the purpose");
        let mut t = s.clone();
        *t.last_mut().unwrap() ^= 1;
        assert!(k.unseal(b"a", &t).is_err());
        assert!(matches!(k.unseal(b"a", &s[..5]), Err(SealError::Truncated)));
        assert!(SealingKey::from_bytes([5; 32]).unseal(b"a", &s).is_err());
    }

    #[test]
    fn dev_key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let a = SealingKey::load_or_create_dev(&p).unwrap();
        assert!(a.is_insecure());
        let b = SealingKey::load_or_create_dev(&p).unwrap();
        assert_eq!(&*b.unseal(b"x", &a.seal(b"x", b"y")).unwrap(), b"y");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&p, b"short").unwrap();
        assert!(SealingKey::load_or_create_dev(&p).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn provisioned_keys_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let write = |bytes: &[u8], mode: u32| {
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write(&[3; 32], 0o600);
        let raw = SealingKey::from_provisioned_file(&p).unwrap();
        assert!(!raw.is_insecure());
        write(format!("{}\n", hex::encode([3; 32])).as_bytes(), 0o400);
        let hexed = SealingKey::from_provisioned_file(&p).unwrap();
        assert_eq!(&*hexed.unseal(b"a", &raw.seal(b"a", b"x")).unwrap(), b"x", "raw and hex forms are the same key");
        for (bytes, mode, why) in [
            (&[3u8; 32][..], 0o644, "0600"),
            (&[3u8; 31][..], 0o600, "expected 32 raw bytes"),
            (&[0u8; 32][..], 0o600, "all zeros"),
            (b"zz".as_slice(), 0o600, "64 hex digits"),
        ] {
            write(bytes, mode);
            let e = SealingKey::from_provisioned_file(&p).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        assert!(SealingKey::from_provisioned_file(&dir.path().join("missing")).is_err());
    }
}
