//! Writing key material to disk: mode 0600 from the moment the file exists (never a
//! window with the umask's permissions), flushed to stable storage before success is
//! reported. Shared by every crate that keeps a private key or a sealing key in a file.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` with mode 0600 and fsyncs it. With `overwrite` false the file
/// must not exist yet (an existing key is never silently replaced). Creates missing
/// parent folders.
pub fn write_private(path: &Path, bytes: &[u8], overwrite: bool) -> std::io::Result<()> {
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_mode_and_no_silent_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a/b/key");
        write_private(&p, b"one", false).expect("first write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(write_private(&p, b"two", false).expect_err("exists").kind(), std::io::ErrorKind::AlreadyExists);
        write_private(&p, b"three", true).expect("overwrite");
        assert_eq!(std::fs::read(&p).expect("read"), b"three");
    }
}
