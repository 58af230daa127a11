//! A Merkle tree log in the manner of Certificate Transparency (RFC 6962 / RFC 9162 §2.1):
//! leaf hashes `SHA-256(0x00 ‖ entry)`, interior nodes `SHA-256(0x01 ‖ left ‖ right)`,
//! the tree over n leaves split at the largest power of two below n. Inclusion proofs
//! show an entry is in a tree head; consistency proofs show a later tree head extends an
//! earlier one (no entry changed, removed or reordered: no fork, no truncation).
//!
//! Everything here is pure: the log holds leaf hashes in memory (32 bytes per entry), and
//! verification needs only hashes, so auditors check proofs offline.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// `SHA-256(0x00 ‖ entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    Sha256::new().chain_update([0u8]).chain_update(entry).finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new().chain_update([1u8]).chain_update(left).chain_update(right).finalize().into()
}

/// The root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("index {index} is not below the tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("tree size {old} is larger than {new}")]
    SizeOrder { old: u64, new: u64 },
    #[error("the proof has {found} hashes, {expected} expected")]
    Length { expected: usize, found: usize },
    #[error("the proof does not lead to the root hash")]
    RootMismatch,
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Merkle tree hash of `leaves` (already leaf-hashed), RFC 6962 §2.1.
pub fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// The audit path for leaf `m` in the tree over `leaves` (RFC 6962 §2.1.1).
pub fn inclusion_proof(leaves: &[Hash], m: u64) -> Result<Vec<Hash>, ProofError> {
    inclusion_with(leaves.len() as u64, m, &|a, b| root_of(&leaves[a as usize..b as usize]))
}

/// The consistency proof from the tree over the first `m` leaves to the tree over all
/// of `leaves` (RFC 6962 §2.1.2).
pub fn consistency_proof(leaves: &[Hash], m: u64) -> Result<Vec<Hash>, ProofError> {
    consistency_with(leaves.len() as u64, m, &|a, b| root_of(&leaves[a as usize..b as usize]))
}

/// RFC 6962's PATH over leaves `[0, n)`, given the root of any range `[a, b)`.
fn inclusion_with(n: u64, m: u64, range_root: &dyn Fn(u64, u64) -> Hash) -> Result<Vec<Hash>, ProofError> {
    if m >= n {
        return Err(ProofError::IndexOutOfRange { index: m, size: n });
    }
    fn path(m: u64, start: u64, end: u64, range_root: &dyn Fn(u64, u64) -> Hash) -> Vec<Hash> {
        if end - start <= 1 {
            return Vec::new();
        }
        let k = split(end - start);
        if m < k {
            let mut p = path(m, start, start + k, range_root);
            p.push(range_root(start + k, end));
            p
        } else {
            let mut p = path(m - k, start + k, end, range_root);
            p.push(range_root(start, start + k));
            p
        }
    }
    Ok(path(m, 0, n, range_root))
}

/// RFC 6962's PROOF(m, D[0:n]), given the root of any range `[a, b)`.
fn consistency_with(n: u64, m: u64, range_root: &dyn Fn(u64, u64) -> Hash) -> Result<Vec<Hash>, ProofError> {
    if m > n {
        return Err(ProofError::SizeOrder { old: m, new: n });
    }
    if m == 0 || m == n {
        return Ok(Vec::new());
    }
    fn subproof(m: u64, start: u64, end: u64, complete: bool, range_root: &dyn Fn(u64, u64) -> Hash) -> Vec<Hash> {
        let n = end - start;
        if m == n {
            return if complete { Vec::new() } else { vec![range_root(start, end)] };
        }
        let k = split(n);
        if m <= k {
            let mut p = subproof(m, start, start + k, complete, range_root);
            p.push(range_root(start + k, end));
            p
        } else {
            let mut p = subproof(m - k, start + k, end, false, range_root);
            p.push(range_root(start, start + k));
            p
        }
    }
    Ok(subproof(m, 0, n, true, range_root))
}

/// Verifies that `leaf` (a leaf hash) is at `index` in the tree of `size` with `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::Length { expected: proof.len() - 1, found: proof.len() });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::Length { expected: proof.len() + 1, found: proof.len() });
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Verifies that the tree (`size2`, `root2`) extends the tree (`size1`, `root1`)
/// (RFC 9162 §2.1.4.2).
pub fn verify_consistency(size1: u64, size2: u64, proof: &[Hash], root1: &Hash, root2: &Hash) -> Result<(), ProofError> {
    if size1 > size2 {
        return Err(ProofError::SizeOrder { old: size1, new: size2 });
    }
    if size1 == size2 {
        if !proof.is_empty() {
            return Err(ProofError::Length { expected: 0, found: proof.len() });
        }
        return if root1 == root2 { Ok(()) } else { Err(ProofError::RootMismatch) };
    }
    if size1 == 0 {
        // The empty tree is a prefix of every tree, but only the empty tree's root is its root.
        if !proof.is_empty() {
            return Err(ProofError::Length { expected: 0, found: proof.len() });
        }
        return if *root1 == empty_root() { Ok(()) } else { Err(ProofError::RootMismatch) };
    }
    if proof.is_empty() {
        return Err(ProofError::Length { expected: 1, found: 0 });
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if size1.is_power_of_two() {
        path.insert(0, *root1);
    }
    let (mut fn_, mut sn) = (size1 - 1, size2 - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return Err(ProofError::Length { expected: path.len() - 1, found: path.len() });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::Length { expected: path.len() + 1, found: path.len() });
    }
    if &fr != root1 || &sr != root2 {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// A tree head signed by the log's key (the enclave's identity key): the tree size, its
/// root and when it was signed. Auditors keep heads and check later ones against them
/// with consistency proofs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedTreeHead {
    pub tree_size: u64,
    /// Hex of the root hash.
    pub root_hash: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Hex of the Ed25519 signature over [`SignedTreeHead::signed_bytes`].
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the tree head is malformed: {0}")]
    Malformed(String),
    #[error("the tree head's signature does not verify with the log key")]
    BadSignature,
}

impl SignedTreeHead {
    /// The bytes signed: a domain label, then size, root and time, fixed-width big-endian.
    pub fn signed_bytes(tree_size: u64, root: &Hash, timestamp_ms: u64) -> Vec<u8> {
        let mut v = b"tessera tree head v1\0".to_vec();
        v.extend_from_slice(&tree_size.to_be_bytes());
        v.extend_from_slice(root);
        v.extend_from_slice(&timestamp_ms.to_be_bytes());
        v
    }

    /// The root hash, decoded.
    pub fn root(&self) -> Result<Hash, HeadError> {
        hex::decode(&self.root_hash).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| HeadError::Malformed("root_hash is not 32 bytes of hex".into()))
    }

    /// Checks the signature with the log's Ed25519 public key.
    pub fn verify(&self, public_key: &[u8; 32]) -> Result<(), HeadError> {
        let root = self.root()?;
        let sig = hex::decode(&self.signature).ok().filter(|s| s.len() == 64).ok_or_else(|| HeadError::Malformed("signature is not 64 bytes of hex".into()))?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
            .verify(&Self::signed_bytes(self.tree_size, &root, self.timestamp_ms), &sig)
            .map_err(|_| HeadError::BadSignature)
    }
}

/// An append-only log of leaf hashes. It keeps the hash of every complete, aligned
/// subtree (2n hashes in all), so a root, an inclusion proof or a consistency proof
/// costs O(log² n) hash lookups and computations instead of rehashing the whole tree.
#[derive(Debug, Clone, Default)]
pub struct MerkleLog {
    /// `levels[h][i]` is the root of leaves `[i·2^h, (i+1)·2^h)`; `levels[0]` are the leaves.
    levels: Vec<Vec<Hash>>,
}

impl MerkleLog {
    pub fn new() -> MerkleLog {
        MerkleLog::default()
    }

    /// Appends an entry; returns its index.
    pub fn append(&mut self, entry: &[u8]) -> u64 {
        self.push_leaf_hash(leaf_hash(entry));
        self.size() - 1
    }

    /// Appends an already computed leaf hash (when restoring a persisted log).
    pub fn push_leaf_hash(&mut self, h: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(h);
        let mut level = 0;
        while self.levels[level].len().is_multiple_of(2) {
            let l = &self.levels[level];
            let parent = node_hash(&l[l.len() - 2], &l[l.len() - 1]);
            if self.levels.len() == level + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[level + 1].push(parent);
            level += 1;
        }
    }

    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// The root of leaves `[start, end)` (`end <= size`), from cached complete subtrees.
    fn range_root(&self, start: u64, end: u64) -> Hash {
        let n = end - start;
        match n {
            0 => empty_root(),
            1 => self.levels[0][start as usize],
            _ if n.is_power_of_two() && start.is_multiple_of(n) => self.levels[n.trailing_zeros() as usize][(start / n) as usize],
            _ => {
                let k = split(n);
                node_hash(&self.range_root(start, start + k), &self.range_root(start + k, end))
            }
        }
    }

    fn check_size(&self, size: u64) -> Result<(), ProofError> {
        if size > self.size() {
            return Err(ProofError::SizeOrder { old: size, new: self.size() });
        }
        Ok(())
    }

    pub fn root(&self) -> Hash {
        self.range_root(0, self.size())
    }

    /// The root of the tree over the first `size` entries.
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        self.check_size(size)?;
        Ok(self.range_root(0, size))
    }

    /// Audit path of entry `index` in the tree of `size` entries.
    pub fn inclusion(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(size)?;
        inclusion_with(size, index, &|a, b| self.range_root(a, b))
    }

    /// Consistency proof between the trees of `old` and `new` entries.
    pub fn consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(new)?;
        consistency_with(new, old, &|a, b| self.range_root(a, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(format!("entry {i}").as_bytes())).collect()
    }

    /// The reference: a tree built level by level, as a naive implementation would,
    /// promoting an odd last node unchanged (which RFC 6962's split rule is equivalent to).
    fn reference_root(l: &[Hash]) -> Hash {
        if l.is_empty() {
            return empty_root();
        }
        let mut level = l.to_vec();
        while level.len() > 1 {
            level = level.chunks(2).map(|c| if c.len() == 2 { node_hash(&c[0], &c[1]) } else { c[0] }).collect();
        }
        level[0]
    }

    /// RFC 6962's test vectors (as in Google's certificate-transparency tests): roots of
    /// the trees over the first n of eight known leaves.
    #[test]
    fn the_empty_tree_is_a_prefix_only_under_its_own_root() {
        let l = leaves(5);
        let r2 = root_of(&l);
        assert!(verify_consistency(0, 5, &[], &empty_root(), &r2).is_ok());
        // A "previous head" of size 0 with any other root is not the empty tree.
        assert_eq!(verify_consistency(0, 5, &[], &r2, &r2), Err(ProofError::RootMismatch));
        assert_eq!(verify_consistency(0, 0, &[], &r2, &empty_root()), Err(ProofError::RootMismatch));
    }

    #[test]
    fn rfc6962_reference_roots() {
        let data: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let l: Vec<Hash> = data.iter().map(|d| leaf_hash(d)).collect();
        for (n, want) in roots.iter().enumerate() {
            assert_eq!(hex::encode(root_of(&l[..n + 1])), *want, "root of {} leaves", n + 1);
        }
        assert_eq!(hex::encode(empty_root()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    proptest! {
        #[test]
        fn roots_match_the_reference(n in 0usize..70) {
            let l = leaves(n);
            prop_assert_eq!(root_of(&l), reference_root(&l));
        }

        #[test]
        fn every_inclusion_proof_verifies_and_no_other_leaf_does(n in 1usize..60, pick in any::<prop::sample::Index>()) {
            let l = leaves(n);
            let root = root_of(&l);
            let m = pick.index(n) as u64;
            let proof = inclusion_proof(&l, m).unwrap();
            prop_assert!(verify_inclusion(&l[m as usize], m, n as u64, &proof, &root).is_ok());
            let other = leaf_hash(b"not in the log");
            prop_assert!(verify_inclusion(&other, m, n as u64, &proof, &root).is_err());
            if n > 1 {
                let wrong = (m + 1) % n as u64;
                prop_assert!(verify_inclusion(&l[m as usize], wrong, n as u64, &proof, &root).is_err());
            }
            if !proof.is_empty() {
                let mut bad = proof.clone();
                bad[0][0] ^= 1;
                prop_assert!(verify_inclusion(&l[m as usize], m, n as u64, &bad, &root).is_err());
                prop_assert!(verify_inclusion(&l[m as usize], m, n as u64, &proof[1..], &root).is_err());
            }
        }

        #[test]
        fn consistency_holds_for_prefixes_and_fails_for_forks(n in 1usize..60, a in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>()) {
            let l = leaves(n);
            let m = a.index(n + 1) as u64;
            let proof = consistency_proof(&l, m).unwrap();
            let (r1, r2) = (root_of(&l[..m as usize]), root_of(&l));
            prop_assert!(verify_consistency(m, n as u64, &proof, &r1, &r2).is_ok());
            if m > 0 && (m as usize) < n {
                // A fork: one of the first m entries differs in the new tree.
                let mut forked = l.clone();
                forked[flip.index(m as usize)] = leaf_hash(b"rewritten");
                let fr2 = root_of(&forked);
                let fproof = consistency_proof(&forked, m).unwrap();
                prop_assert!(verify_consistency(m, n as u64, &fproof, &r1, &fr2).is_err());
                // A truncated proof, or an old head the new tree does not extend, is refused.
                prop_assert!(verify_consistency(m, n as u64, &proof[..proof.len() - 1], &r1, &r2).is_err());
                let other_old = leaf_hash(b"another history");
                prop_assert!(verify_consistency(m, n as u64, &proof, &other_old, &r2).is_err());
            }
        }
    }

    #[test]
    fn a_truncated_log_is_not_consistent_with_its_earlier_head() {
        let l = leaves(10);
        let (old_root, old_size) = (root_of(&l), 10u64);
        let truncated = &l[..7];
        // The host tries to present the shorter log as the current one.
        assert!(matches!(consistency_proof(truncated, old_size), Err(ProofError::SizeOrder { .. })));
        assert!(verify_consistency(old_size, 7, &[], &old_root, &root_of(truncated)).is_err());
    }

    #[test]
    fn signed_tree_heads_verify_and_bind_every_field() {
        use ring::signature::{Ed25519KeyPair, KeyPair};
        let key = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).expect("key");
        let public: [u8; 32] = key.public_key().as_ref().try_into().expect("32 bytes");
        let root = root_of(&leaves(5));
        let sign = |size: u64, root: &Hash, ts: u64| SignedTreeHead {
            tree_size: size,
            root_hash: hex::encode(root),
            timestamp_ms: ts,
            signature: hex::encode(key.sign(&SignedTreeHead::signed_bytes(size, root, ts)).as_ref()),
        };
        let head = sign(5, &root, 1_000);
        head.verify(&public).expect("verifies");
        let json = serde_json::to_string(&head).expect("json");
        let back: SignedTreeHead = serde_json::from_str(&json).expect("parse");
        back.verify(&public).expect("verifies after a round trip");
        for tampered in [
            SignedTreeHead { tree_size: 6, ..head.clone() },
            SignedTreeHead { timestamp_ms: 1_001, ..head.clone() },
            SignedTreeHead { root_hash: hex::encode(root_of(&leaves(4))), ..head.clone() },
        ] {
            assert_eq!(tampered.verify(&public), Err(HeadError::BadSignature));
        }
        assert!(matches!(SignedTreeHead { root_hash: "zz".into(), ..head.clone() }.verify(&public), Err(HeadError::Malformed(_))));
        let other = Ed25519KeyPair::from_seed_unchecked(&[8; 32]).expect("key");
        let other_pub: [u8; 32] = other.public_key().as_ref().try_into().expect("32 bytes");
        assert_eq!(head.verify(&other_pub), Err(HeadError::BadSignature));
    }

    proptest! {
        /// The cached-subtree log answers exactly as the plain functions over the leaves.
        #[test]
        fn cached_log_matches_the_plain_functions(n in 1usize..140, a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
            let l = leaves(n);
            let mut log = MerkleLog::new();
            for h in &l {
                log.push_leaf_hash(*h);
            }
            let size = b.index(n) as u64 + 1;
            let m = a.index(size as usize) as u64;
            prop_assert_eq!(log.root(), root_of(&l));
            prop_assert_eq!(log.root_at(size).unwrap(), root_of(&l[..size as usize]));
            prop_assert_eq!(log.inclusion(m, size).unwrap(), inclusion_proof(&l[..size as usize], m).unwrap());
            prop_assert_eq!(log.consistency(m, size).unwrap(), consistency_proof(&l[..size as usize], m).unwrap());
        }
    }

    #[test]
    fn log_api() {
        let mut log = MerkleLog::new();
        for i in 0..13 {
            assert_eq!(log.append(format!("e{i}").as_bytes()), i);
        }
        let old = log.root_at(5).unwrap();
        let proof = log.consistency(5, 13).unwrap();
        verify_consistency(5, 13, &proof, &old, &log.root()).unwrap();
        let p = log.inclusion(3, 13).unwrap();
        verify_inclusion(&leaf_hash(b"e3"), 3, 13, &p, &log.root()).unwrap();
        assert!(log.inclusion(3, 14).is_err());
    }
}
