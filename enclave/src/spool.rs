//! Masked inputs held in files outside the enclave: an upload spooled as it arrived, or
//! stored inputs read back for a restore (one file holds them all, each at its offset, so
//! a restore of n inputs opens one file, not n).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// `len` bytes at `offset` of a shared file. The file is the host's: whatever reads it
/// (the streamed fold) hashes what it reads and checks the sender's signature over it.
#[derive(Clone, Debug)]
pub struct SpooledInput {
    file: Arc<File>,
    offset: u64,
    len: u64,
}

impl SpooledInput {
    /// The whole of `file`.
    pub fn whole(file: File) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(SpooledInput { file: Arc::new(file), offset: 0, len })
    }

    /// `len` bytes at `offset` of `file`.
    pub fn part(file: Arc<File>, offset: u64, len: u64) -> Self {
        SpooledInput { file, offset, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `buf` from byte `pos` of the input.
    pub fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        if pos.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end of the spooled input"));
        }
        self.file.read_exact_at(buf, self.offset + pos)
    }

    /// A reader over the input, from its start.
    pub fn reader(&self) -> SpooledReader<'_> {
        SpooledReader { input: self, pos: 0 }
    }
}

/// [`Read`] and [`Seek`] over a [`SpooledInput`], with a position of its own (the file's
/// cursor is not used, so readers of one file do not disturb each other).
#[derive(Debug)]
pub struct SpooledReader<'a> {
    input: &'a SpooledInput,
    pos: u64,
}

impl Read for SpooledReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.input.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.input.file.read_at(&mut buf[..n], self.input.offset + self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for SpooledReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.input.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start of the spooled input")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A part reads as its own bytes only: from its start, after seeks from either end,
    /// and never past its end into the next part.
    #[test]
    fn a_part_reads_as_its_own_bytes() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"aaaaHELLObbbb").unwrap();
        let file = Arc::new(f);
        let part = SpooledInput::part(file.clone(), 4, 5);
        let mut all = Vec::new();
        part.reader().read_to_end(&mut all).unwrap();
        assert_eq!(all, b"HELLO");
        let mut r = part.reader();
        assert_eq!(r.seek(SeekFrom::End(-2)).unwrap(), 3);
        let mut two = [0u8; 4];
        assert_eq!(r.read(&mut two).unwrap(), 2);
        assert_eq!(&two[..2], b"LO");
        assert_eq!(r.read(&mut two).unwrap(), 0, "nothing past the part's end");
        assert!(r.seek(SeekFrom::Current(-10)).is_err());
        let mut buf = [0u8; 3];
        part.read_exact_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"ELL");
        assert!(part.read_exact_at(&mut buf, 3).is_err(), "a read past the end is refused");
        assert!(SpooledInput::part(file, 13, 0).is_empty());
    }
}
