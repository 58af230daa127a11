//! Key agreement, key derivation, share encryption and message signatures.
//!
//! - X25519 (`x25519-dalek`) between the per-round keys each client advertises;
//! - HKDF-SHA256 turns a shared point into a pairwise mask seed or a share-encryption
//!   key, salted with the round-config digest and labelled with the pair of ids, so no
//!   key is reused across rounds, roles or pairs;
//! - AES-256-GCM encrypts the shares a client deals to a neighbour (relayed by the
//!   server, which must not read them); the AAD binds the round and both ids;
//! - Ed25519 (`ring`) signs every protocol message under the institution's long-term key.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::config::ClientId;
use crate::error::Error;

/// Signs protocol transcripts under an institution's long-term key.
pub trait MessageSigner: Send + Sync {
    fn sign(&self, message: &[u8]) -> [u8; 64];
    fn public_key(&self) -> [u8; 32];
}

impl MessageSigner for ring::signature::Ed25519KeyPair {
    fn sign(&self, message: &[u8]) -> [u8; 64] {
        let sig = ring::signature::Ed25519KeyPair::sign(self, message);
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        out
    }

    fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::signature::KeyPair::public_key(self).as_ref());
        out
    }
}

/// A ChaCha20 generator keyed with 256 bits from the operating system: for the many
/// draws of stochastic rounding and DP noise (one per coordinate). Drawing each of those
/// from `OsRng` costs a `getrandom` system call per draw; with a thousand institutions in
/// one load-test process that was a third of the CPU time, all of it in the kernel.
pub fn seeded_csprng() -> rand_chacha::ChaCha20Rng {
    use rand::SeedableRng;
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(seed.as_mut());
    rand_chacha::ChaCha20Rng::from_seed(*seed)
}

pub fn verify_signature(public_key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key).verify(message, signature).is_ok()
}

/// A domain-separated, length-prefixed byte string to sign.
#[derive(Debug)]
pub struct Transcript(Vec<u8>);

impl Transcript {
    pub fn new(label: &str, config_digest: &[u8; 32], round: u64) -> Self {
        let mut t = Transcript(Vec::with_capacity(128));
        t.bytes(b"tessera/secagg/v1");
        t.bytes(label.as_bytes());
        t.bytes(config_digest);
        t.u64(round);
        t
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn id(&mut self, id: ClientId) -> &mut Self {
        self.0.extend_from_slice(&id.0.to_le_bytes());
        self
    }

    pub fn ids(&mut self, ids: &[ClientId]) -> &mut Self {
        self.u64(ids.len() as u64);
        for &id in ids {
            self.id(id);
        }
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// An X25519 key pair generated for one round.
pub struct RoundKey {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for RoundKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RoundKey {{ public: {}, secret: <redacted> }}", hex::encode(self.public.as_bytes()))
    }
}

impl RoundKey {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let secret = StaticSecret::random_from_rng(rng);
        let public = PublicKey::from(&secret);
        RoundKey { secret, public }
    }

    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        RoundKey { secret, public }
    }

    pub fn public(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// HKDF-SHA256 of the X25519 point, salted with the round digest and labelled with
    /// the role and the unordered pair of ids, so both ends derive the same 32 bytes.
    pub fn derive(&self, peer_public: &[u8; 32], config_digest: &[u8; 32], role: &[u8], a: ClientId, b: ClientId) -> Result<Zeroizing<[u8; 32]>, Error> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(Error::Crypto("peer public key is a low-order point"));
        }
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut info = Vec::with_capacity(role.len() + 8);
        info.extend_from_slice(role);
        info.extend_from_slice(&lo.0.to_le_bytes());
        info.extend_from_slice(&hi.0.to_le_bytes());
        let hk = Hkdf::<Sha256>::new(Some(config_digest), shared.as_bytes());
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(&info, out.as_mut()).map_err(|_| Error::Crypto("HKDF expand"))?;
        Ok(out)
    }
}

pub const MASK_ROLE: &[u8] = b"pairwise-mask";
pub const SHARE_ROLE: &[u8] = b"share-encryption";

fn share_nonce(from: ClientId, to: ClientId) -> [u8; 12] {
    // Each direction of a pair encrypts exactly once per round under a round-unique key.
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.0.to_le_bytes());
    n[4..8].copy_from_slice(&to.0.to_le_bytes());
    n
}

fn share_aad(config_digest: &[u8; 32], round: u64, from: ClientId, to: ClientId) -> Vec<u8> {
    let mut t = Transcript::new("share-ciphertext", config_digest, round);
    t.id(from).id(to);
    t.0
}

pub fn encrypt_share(key: &[u8; 32], config_digest: &[u8; 32], round: u64, from: ClientId, to: ClientId, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    let cipher = Aes256Gcm::new(key.into());
    let aad = share_aad(config_digest, round, from, to);
    cipher.encrypt(Nonce::from_slice(&share_nonce(from, to)), Payload { msg: plaintext, aad: &aad }).map_err(|_| Error::Crypto("share encryption failed"))
}

pub fn decrypt_share(
    key: &[u8; 32],
    config_digest: &[u8; 32],
    round: u64,
    from: ClientId,
    to: ClientId,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let cipher = Aes256Gcm::new(key.into());
    let aad = share_aad(config_digest, round, from, to);
    cipher
        .decrypt(Nonce::from_slice(&share_nonce(from, to)), Payload { msg: ciphertext, aad: &aad })
        .map(Zeroizing::new)
        .map_err(|_| Error::Crypto("share ciphertext does not authenticate"))
}

/// Binding commitment to a client's self-mask seed, sent (signed) with its shares, so the
/// aggregator can tell a correct reconstruction from one poisoned by a lying neighbour.
pub fn self_mask_commitment(config_digest: &[u8; 32], client: ClientId, seed: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tessera/self-mask-commitment/v1");
    h.update(config_digest);
    h.update(client.0.to_le_bytes());
    h.update(seed);
    h.finalize().into()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn both_ends_derive_the_same_seed_and_roles_differ() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let (a, b) = (RoundKey::generate(&mut rng), RoundKey::generate(&mut rng));
        let d = [9u8; 32];
        let ab = a.derive(&b.public(), &d, MASK_ROLE, ClientId(1), ClientId(2)).unwrap();
        let ba = b.derive(&a.public(), &d, MASK_ROLE, ClientId(2), ClientId(1)).unwrap();
        assert_eq!(*ab, *ba);
        let share = a.derive(&b.public(), &d, SHARE_ROLE, ClientId(1), ClientId(2)).unwrap();
        assert_ne!(*ab, *share);
        let other_round = a.derive(&b.public(), &[8; 32], MASK_ROLE, ClientId(1), ClientId(2)).unwrap();
        assert_ne!(*ab, *other_round);
    }

    #[test]
    fn low_order_point_is_refused() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let a = RoundKey::generate(&mut rng);
        assert!(a.derive(&[0u8; 32], &[0; 32], MASK_ROLE, ClientId(0), ClientId(1)).is_err());
    }

    #[test]
    fn share_ciphertext_is_bound_to_direction_and_round() {
        let key = [3u8; 32];
        let d = [1u8; 32];
        let ct = encrypt_share(&key, &d, 5, ClientId(1), ClientId(2), b"secret").unwrap();
        assert_eq!(&*decrypt_share(&key, &d, 5, ClientId(1), ClientId(2), &ct).unwrap(), b"secret");
        assert!(decrypt_share(&key, &d, 6, ClientId(1), ClientId(2), &ct).is_err());
        assert!(decrypt_share(&key, &d, 5, ClientId(2), ClientId(1), &ct).is_err());
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(decrypt_share(&key, &d, 5, ClientId(1), ClientId(2), &bad).is_err());
    }

    #[test]
    fn ed25519_round_trip() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let sig = MessageSigner::sign(&kp, b"hello");
        assert!(verify_signature(&MessageSigner::public_key(&kp), b"hello", &sig));
        assert!(!verify_signature(&MessageSigner::public_key(&kp), b"hellp", &sig));
    }
}
