//! The allocator's threshold for large blocks, fixed.
//!
//! glibc serves a block of 128 KiB or more from its own mapping, returned to the system
//! when freed, but after the first such free it raises that threshold to the block's
//! size (up to 32 MiB), so later blocks of that size come from the heap of the thread's
//! arena and stay there. The server frees many such blocks on many threads: each
//! upload's spool buffer, each batch of digest leaves the fold and the signature check
//! read, each stored part. With the dynamic threshold, `tessera-load` at m = 6.8M and
//! 10 uploads at once measured a peak while folding of 3.2 × m·4 above the baseline, of
//! which 1 × m·4 is the sum; with it fixed, 1.75 ×.

/// Fixes glibc's mmap threshold at its default, 128 KiB. Called once, first thing in
/// `main`, before any thread starts. Elsewhere than glibc it does nothing.
#[allow(unsafe_code)]
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and only sets the allocator's parameters; it is
    // called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
