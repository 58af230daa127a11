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
    let used = (count as u128 * u128::from(bits)) % 8;
    if used != 0 {
        let last = body[body.len() - 1];
        if last >> used != 0 {
            return Err(Error::malformed("the padding bits after the last packed element are not zero"));
        }
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
            // Extremes too: all zeros and all ones.
            let ones = vec![mask; len];
            prop_assert_eq!(unpack(&pack(&ones, bits), len, bits).unwrap(), ones);
        }
    }
}
