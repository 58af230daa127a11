//! Shamir t-of-k secret sharing of 32-byte secrets over GF(2^8), byte by byte.
//!
//! Field arithmetic uses the AES polynomial x^8 + x^4 + x^3 + x + 1 and is written
//! without secret-dependent branches or table lookups (multiplication by shift-and-mask,
//! inversion as a^254), so share handling does not leak through timing. x-coordinates
//! are 1..=255; the share of neighbour `j` (0-based, in the dealer's sorted neighbour
//! list) has x = j + 1.

use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::Error;

pub const SECRET_LEN: usize = 32;

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct Share {
    pub x: u8,
    #[serde(with = "crate::wire::hexarr")]
    pub y: [u8; SECRET_LEN],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share {{ x: {}, y: <redacted> }}", self.x)
    }
}

/// Multiplication in GF(2^8), constant time.
#[inline]
pub fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    for _ in 0..8 {
        p ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// Multiplicative inverse (a^254); maps 0 to 0.
pub fn gf_inv(a: u8) -> u8 {
    // Square-and-multiply with a fixed exponent: the sequence of operations is public.
    let a2 = gf_mul(a, a);
    let a4 = gf_mul(a2, a2);
    let a8 = gf_mul(a4, a4);
    let a16 = gf_mul(a8, a8);
    let a32 = gf_mul(a16, a16);
    let a64 = gf_mul(a32, a32);
    let a128 = gf_mul(a64, a64);
    // 254 = 128 + 64 + 32 + 16 + 8 + 4 + 2
    gf_mul(gf_mul(gf_mul(gf_mul(gf_mul(gf_mul(a128, a64), a32), a16), a8), a4), a2)
}

/// Splits `secret` into `n` shares with x = 1..=n, any `threshold` of which recover it.
pub fn split<R: RngCore + CryptoRng>(secret: &[u8; SECRET_LEN], threshold: usize, n: usize, rng: &mut R) -> Result<Vec<Share>, Error> {
    if threshold == 0 || threshold > n || n > 255 {
        return Err(Error::Config(format!("cannot share {threshold}-of-{n}")));
    }
    // coefficients[j] holds the degree-j coefficient of all 32 byte-polynomials.
    let mut coefficients = vec![[0u8; SECRET_LEN]; threshold];
    coefficients[0] = *secret;
    for c in coefficients.iter_mut().skip(1) {
        rng.fill_bytes(c);
    }
    let shares = (1..=n as u8)
        .map(|x| {
            let mut y = [0u8; SECRET_LEN];
            // Horner's rule from the highest coefficient.
            for c in coefficients.iter().rev() {
                for (yb, cb) in y.iter_mut().zip(c) {
                    *yb = gf_mul(*yb, x) ^ cb;
                }
            }
            Share { x, y }
        })
        .collect();
    coefficients.zeroize();
    Ok(shares)
}

/// Recovers the secret from the first `threshold` of `shares` by Lagrange interpolation
/// at zero. The x-coordinates must be distinct and non-zero.
pub fn reconstruct(shares: &[Share], threshold: usize) -> Result<[u8; SECRET_LEN], Error> {
    if threshold == 0 || shares.len() < threshold {
        return Err(Error::Crypto("too few shares to reconstruct"));
    }
    let used = &shares[..threshold];
    for (i, s) in used.iter().enumerate() {
        if s.x == 0 || used[..i].iter().any(|o| o.x == s.x) {
            return Err(Error::Crypto("share x-coordinates must be distinct and non-zero"));
        }
    }
    let mut secret = [0u8; SECRET_LEN];
    for (i, si) in used.iter().enumerate() {
        // Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i); subtraction is XOR.
        let (mut num, mut den) = (1u8, 1u8);
        for (j, sj) in used.iter().enumerate() {
            if i != j {
                num = gf_mul(num, sj.x);
                den = gf_mul(den, sj.x ^ si.x);
            }
        }
        let l = gf_mul(num, gf_inv(den));
        for (s, y) in secret.iter_mut().zip(&si.y) {
            *s ^= gf_mul(*y, l);
        }
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn slow_mul(a: u8, b: u8) -> u8 {
        let mut p: u16 = 0;
        for i in 0..8 {
            if b >> i & 1 == 1 {
                p ^= (a as u16) << i;
            }
        }
        for i in (8..16).rev() {
            if p >> i & 1 == 1 {
                p ^= 0x11b << (i - 8);
            }
        }
        p as u8
    }

    #[test]
    fn field_arithmetic_exhaustive() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(gf_mul(a, b), slow_mul(a, b), "{a}*{b}");
            }
            if a != 0 {
                assert_eq!(gf_mul(a, gf_inv(a)), 1, "inverse of {a}");
            }
        }
        assert_eq!(gf_inv(0), 0);
    }

    #[test]
    fn every_threshold_subset_reconstructs() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let secret = [0xA5u8; 32];
        for n in 1..=7usize {
            for t in 1..=n {
                let shares = split(&secret, t, n, &mut rng).unwrap();
                // Every subset of size t, in every rotation of order.
                for mask in 0u32..(1 << n) {
                    if mask.count_ones() as usize != t {
                        continue;
                    }
                    let subset: Vec<Share> = (0..n).filter(|i| mask >> i & 1 == 1).map(|i| shares[i].clone()).collect();
                    assert_eq!(reconstruct(&subset, t).unwrap(), secret, "n={n} t={t} mask={mask:b}");
                }
            }
        }
    }

    #[test]
    fn fewer_than_threshold_reveal_nothing_structural() {
        // With t-1 shares every candidate secret is consistent: interpolate through the
        // t-1 shares plus a guessed point (0, g) and check a further real share disagrees
        // for all but one g.
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(6);
        let shares = split(&[42; 32], 3, 5, &mut rng).unwrap();
        assert!(reconstruct(&shares[..2], 3).is_err());
        let wrong = reconstruct(&[shares[0].clone(), shares[1].clone(), Share { x: 3, y: [0; 32] }], 3).unwrap();
        assert_ne!(wrong, [42; 32]);
    }

    #[test]
    fn rejects_duplicate_or_zero_x() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let s = split(&[1; 32], 2, 3, &mut rng).unwrap();
        assert!(reconstruct(&[s[0].clone(), s[0].clone()], 2).is_err());
        assert!(reconstruct(&[Share { x: 0, y: [0; 32] }, s[1].clone()], 2).is_err());
        assert!(split(&[1; 32], 0, 3, &mut rng).is_err());
        assert!(split(&[1; 32], 4, 3, &mut rng).is_err());
    }
}
