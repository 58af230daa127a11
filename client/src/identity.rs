//! An institution's long-term Ed25519 identity, kept in its own directory. The private
//! key (PKCS#8) is written with mode 0600 and never printed; the public key is what the
//! aggregator's operator lists in the server configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{0} already holds an identity; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("the key in {0} is not a valid Ed25519 PKCS#8 key")]
    BadKey(PathBuf),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    pub name: String,
    pub public_key: String,
}

pub struct Identity {
    pub name: String,
    pub key: Arc<Ed25519KeyPair>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity {{ name: {}, public_key: {} }}", self.name, self.public_key_hex())
    }
}

const KEY_FILE: &str = "identity.pk8";
const META_FILE: &str = "identity.toml";

impl Identity {
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.public_key().as_ref())
    }

    /// Creates a new identity in `dir` (which must not hold one already).
    pub fn init(dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() {
            return Err(IdentityError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(|e| IdentityError::File { path: dir.to_path_buf(), why: e.to_string() })?;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Zeroizing::new(Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| IdentityError::BadKey(key_path.clone()))?.as_ref().to_vec());
        tessera_attestation::keyfile::write_private(&key_path, &pkcs8, false)
            .map_err(|e| IdentityError::File { path: key_path.clone(), why: e.to_string() })?;
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| IdentityError::BadKey(key_path.clone()))?;
        let id = Identity { name: name.to_string(), key: Arc::new(key) };
        let meta = IdentityFile { name: name.to_string(), public_key: id.public_key_hex() };
        let text = toml::to_string(&meta).map_err(|e| IdentityError::File { path: dir.join(META_FILE), why: e.to_string() })?;
        std::fs::write(dir.join(META_FILE), text).map_err(|e| IdentityError::File { path: dir.join(META_FILE), why: e.to_string() })?;
        Ok(id)
    }

    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let key_path = dir.join(KEY_FILE);
        let meta_path = dir.join(META_FILE);
        let pkcs8 = Zeroizing::new(std::fs::read(&key_path).map_err(|e| IdentityError::File { path: key_path.clone(), why: e.to_string() })?);
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| IdentityError::BadKey(key_path.clone()))?;
        let text = std::fs::read_to_string(&meta_path).map_err(|e| IdentityError::File { path: meta_path.clone(), why: e.to_string() })?;
        let meta: IdentityFile = toml::from_str(&text).map_err(|e| IdentityError::File { path: meta_path.clone(), why: e.to_string() })?;
        let id = Identity { name: meta.name, key: Arc::new(key) };
        if !id.public_key_hex().eq_ignore_ascii_case(&meta.public_key) {
            return Err(IdentityError::File { path: meta_path, why: "public_key does not match identity.pk8".into() });
        }
        Ok(id)
    }

    /// The snippet the aggregator's operator pastes into the server configuration.
    pub fn server_config_snippet(&self) -> String {
        format!("[[institutions]]\nname = \"{}\"\npublic_key = \"{}\"\n", self.name, self.public_key_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_load_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::init(dir.path(), "hospital-a").unwrap();
        let b = Identity::load(dir.path()).unwrap();
        assert_eq!(a.public_key_hex(), b.public_key_hex());
        assert!(matches!(Identity::init(dir.path(), "x"), Err(IdentityError::Exists(_))));
        assert!(a.server_config_snippet().contains(&a.public_key_hex()));
        std::fs::write(dir.path().join(KEY_FILE), b"garbage").unwrap();
        assert!(matches!(Identity::load(dir.path()), Err(IdentityError::BadKey(_))));
    }
}
