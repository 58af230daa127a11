//! Bit packing of masked vectors: `b`-bit elements of `Z_{2^b}` travel as `b` bits each,
//! not as 32-bit words, so the bytes on the wire follow the round's modulus.
//!
//! The layout is a little-endian bit stream: element `i` occupies stream bits
//! `i·b .. (i+1)·b`, least significant bit first, and stream bit `j` is bit `j mod 8` of
//! byte `j / 8` (NumPy's `packbits(..., bitorder="little")` of each element's bits, least
//! significant first). The bits that pad the last byte are zero; a body with a set
//! padding bit is refused, so every vector has exactly one encoding.

use crate::error::Error;

/// Bytes that `count` elements of `bits` bits occupy.
pub fn packed_len(count: usize, bits: u8) -> usize {
    (count as u128 * u128::from(bits)).div_ceil(8) as usize
}

/// Packs `values`, each below `2^bits` (higher bits are dropped), into [`packed_len`] bytes.
pub fn pack(values: &[u32], bits: u8) -> Vec<u8> {
    debug_assert!((1..=32).contains(&bits));
    let mut out = Vec::with_capacity(packed_len(values.len(), bits));
    pack_into(values, bits, &mut out);
    out
}

/// [`pack`], appending to `out`.
pub fn pack_into(values: &[u32], bits: u8, out: &mut Vec<u8>) {
    if bits == 32 {
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        return;
    }
    let mask = (1u64 << bits) - 1;
    let mut acc = 0u64;
    let mut filled = 0u32;
    for &v in values {
        acc |= (u64::from(v) & mask) << filled;
        filled += u32::from(bits);
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
}

/// Checks that `body` is the packing of `count` elements of `bits` bits: its length is
/// [`packed_len`] and the padding bits of its last byte are zero.
pub fn check_packed(body: &[u8], count: usize, bits: u8) -> Result<(), Error> {
    if !(1..=32).contains(&bits) {
        return Err(Error::malformed(format!("packed width of {bits} bits is not in 1..=32")));
    }
    let want = packed_len(count, bits);
    if body.len() != want {
        return Err(Error::malformed(format!("{count} elements of {bits} bits take {want} bytes, the body has {}", body.len())));
    }
    match body.last() {
        Some(&last) => check_padding(last, count, bits),
        None => Ok(()),
    }
}

/// The padding bits after the last of `count` elements of `bits` bits, in the body's
/// last byte, must be zero: one body, one encoding.
pub fn check_padding(last: u8, count: usize, bits: u8) -> Result<(), Error> {
    let used = (count as u128 * u128::from(bits)) % 8;
    if used != 0 && last >> used != 0 {
        return Err(Error::malformed("the padding bits after the last packed element are not zero"));
    }
    Ok(())
}

/// The elements of a packed body, in order. Build it only over a body that passed
/// [`check_packed`]; it yields exactly `count` elements.
#[derive(Clone, Debug)]
pub struct Unpacked<'a> {
    body: &'a [u8],
    pos: usize,
    acc: u64,
    filled: u32,
    bits: u32,
    left: usize,
}

impl<'a> Unpacked<'a> {
    pub fn new(body: &'a [u8], count: usize, bits: u8) -> Self {
        Unpacked { body, pos: 0, acc: 0, filled: 0, bits: u32::from(bits), left: count }
    }
}

impl Iterator for Unpacked<'_> {
    type Item = u32;

    #[inline]
    fn next(&mut self) -> Option<u32> {
        if self.left == 0 {
            return None;
        }
        while self.filled < self.bits {
            // A checked body always holds the bytes its count needs; a short one reads zeros.
            let byte = self.body.get(self.pos).copied().unwrap_or(0);
            self.acc |= u64::from(byte) << self.filled;
            self.pos += 1;
            self.filled += 8;
        }
        let v = (self.acc & ((1u64 << self.bits) - 1)) as u32;
        self.acc >>= self.bits;
        self.filled -= self.bits;
        self.left -= 1;
        Some(v)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Unpacked<'_> {}

/// Adds the `sum.len()` elements of a body that [`check_packed`] accepts to `sum`
/// (wrapping, as the aggregator's fold does), without decoding them into a vector.
///
/// Eight `b`-bit elements are exactly `b` bytes, so the body is read a group of eight
/// at a time: each element is one unaligned little-endian 64-bit load, a constant shift
/// and a mask, with the width a constant of the monomorphized loop. The generic bit
/// reader ([`Unpacked`]) moves one byte at a time and made a 12-bit fold 1.4× slower
/// than a 32-bit one.
pub fn add_packed(sum: &mut [u32], body: &[u8], bits: u8) {
    if !(1..=32).contains(&bits) {
        // No body has this width ([`check_packed`] refuses it): nothing to add.
        return;
    }
    if body.len() < packed_len(sum.len(), bits) {
        // Not a checked body: the bit reader reads the missing bytes as zeros, never past
        // the end, rather than this code indexing out of bounds.
        return add_tail(sum, body, bits);
    }
    macro_rules! widths {
        ($($b:literal)*) => {
            match bits {
                $($b => add_groups::<$b>(sum, body),)*
                _ => add_tail(sum, body, bits),
            }
        };
    }
    widths!(8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32)
}

fn add_groups<const B: usize>(sum: &mut [u32], body: &[u8]) {
    let mask = if B == 32 { u64::from(u32::MAX) } else { (1u64 << B) - 1 };
    let groups = sum.len() / 8;
    // A group's loads reach at most 7B/8 + 8 bytes past its start: within the next group
    // for every group but the last full one, which is copied into a padded buffer.
    let direct = groups.saturating_sub(1);
    let load = |bytes: &[u8], at: usize| -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let add_group = |s: &mut [u32], bytes: &[u8]| {
        for (j, x) in s.iter_mut().enumerate() {
            let bit = j * B;
            *x = x.wrapping_add(((load(bytes, bit / 8) >> (bit % 8)) & mask) as u32);
        }
    };
    for g in 0..direct {
        add_group(&mut sum[g * 8..g * 8 + 8], &body[g * B..]);
    }
    if groups > 0 {
        let g = groups - 1;
        let mut last = [0u8; 40];
        last[..B].copy_from_slice(&body[g * B..g * B + B]);
        add_group(&mut sum[g * 8..g * 8 + 8], &last);
    }
    let done = groups * 8;
    add_tail(&mut sum[done..], &body[groups * B..], B as u8);
}

/// The generic bit reader's fold, for a tail of fewer than eight elements (and widths
/// the aggregator refuses anyway).
fn add_tail(sum: &mut [u32], body: &[u8], bits: u8) {
    let count = sum.len();
    for (s, v) in sum.iter_mut().zip(Unpacked::new(body, count, bits)) {
        *s = s.wrapping_add(v);
    }
}

/// Unpacks a body that [`check_packed`] accepts.
pub fn unpack(body: &[u8], count: usize, bits: u8) -> Result<Vec<u32>, Error> {
    check_packed(body, count, bits)?;
    Ok(Unpacked::new(body, count, bits).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_layout() {
        // 3-bit elements 1, 2, 7, 5: stream bits 100 010 111 101 (LSB first)
        // -> byte 0 = bits 0..8 = 1,0,0,0,1,0,1,1 = 0b1101_0001, byte 1 = 1,1,0,1 = 0b1011.
        assert_eq!(pack(&[1, 2, 7, 5], 3), vec![0b1101_0001, 0b0000_1011]);
        assert_eq!(pack(&[0xABC, 0x123], 12), vec![0xBC, 0x3A, 0x12]);
        assert_eq!(pack(&[0xDEAD_BEEF], 32), 0xDEAD_BEEFu32.to_le_bytes().to_vec());
        assert_eq!(unpack(&[0xBC, 0x3A, 0x12], 2, 12).unwrap(), vec![0xABC, 0x123]);
    }

    #[test]
    fn bad_bodies_are_refused() {
        let body = pack(&[1, 2, 7, 5], 3);
        assert!(check_packed(&body, 4, 3).is_ok());
        let err = check_packed(&body[..1], 4, 3).unwrap_err().to_string();
        assert!(err.contains("take 2 bytes, the body has 1"), "{err}");
        let mut padded = body.clone();
        padded[1] |= 0x10;
        assert!(check_packed(&padded, 4, 3).unwrap_err().to_string().contains("padding bits"));
        assert!(check_packed(&body, 4, 0).is_err());
        assert!(check_packed(&body, 4, 33).is_err());
        // The fold never panics on a body it should not have been given: a width no body
        // has adds nothing, a short body reads zeros past its end.
        let mut sum = vec![1u32; 20];
        add_packed(&mut sum, &body, 0);
        add_packed(&mut sum, &body, 40);
        assert_eq!(sum, vec![1u32; 20]);
        add_packed(&mut sum, &[0xFF; 3], 12);
        assert_eq!(&sum[..3], &[0x1000, 0x1000, 1]);
    }

    proptest! {
        #[test]
        fn unpacking_inverts_packing_for_every_width(bits in 1u8..=32, len in 0usize..300, seed in any::<u64>()) {
            let mask = if bits == 32 { u32::MAX } else { (1u32 << bits) - 1 };
            let mut x = seed;
            let values: Vec<u32> = (0..len).map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 32) as u32) & mask
            }).collect();
            let body = pack(&values, bits);
            prop_assert_eq!(body.len(), packed_len(len, bits));
            prop_assert_eq!(unpack(&body, len, bits).unwrap(), values.clone());
            prop_assert_eq!(Unpacked::new(&body, len, bits).len(), len);
            // The fold adds exactly the unpacked elements, wrapping, at every width.
            let start: Vec<u32> = (0..len as u32).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
            let mut folded = start.clone();
            add_packed(&mut folded, &body, bits);
            let want: Vec<u32> = start.iter().zip(&values).map(|(a, b)| a.wrapping_add(*b)).collect();
            prop_assert_eq!(folded, want);
            // Extremes too: all zeros and all ones.
            let ones = vec![mask; len];
            prop_assert_eq!(unpack(&pack(&ones, bits), len, bits).unwrap(), ones);
        }
    }
}
