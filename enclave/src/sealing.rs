//! Sealing: AES-256-GCM under a key only the enclave holds. On SEV-SNP or TDX the key
//! would come from the firmware's key-derivation request, bound to the measurement; in
//! dev mode it is a file on the host's disk, which protects nothing, and every load of
//! it says so.

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
}

impl SealingKey {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        SealingKey { key: Zeroizing::new(key), insecure: false }
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
}
