//! Makes the client's binaries find libtorch at run time, and really link CUDA when it is there.
//!
//! torch-sys exports the libtorch library folder to its direct dependents as
//! `DEP_TCH_LIBTORCH_LIB` (which is why this crate depends on torch-sys itself). We set an
//! rpath to it, so `tessera-client` runs without `LD_LIBRARY_PATH`.
//!
//! rustc links with `--as-needed`, which drops `libtorch_cuda` (nothing references its
//! symbols directly; it registers the CUDA backend from a static initialiser), and CUDA
//! then stays unavailable on a GPU machine. When the CUDA runtime libraries that
//! `libtorch_cuda` needs are installed beside libtorch (the full PyPI wheel), we link it
//! with `--no-as-needed`. The CPU-only set-up (the wheel without its CUDA dependencies)
//! must not link it: its dependencies are absent and the binary would not load.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=TESSERA_LINK_CUDA");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let lib = Path::new(&lib);
    if cuda_libraries_present(lib) && std::env::var("TESSERA_LINK_CUDA").as_deref() != Ok("0") {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        println!("cargo:warning=linking libtorch_cuda (CUDA libraries found beside libtorch)");
    }
}

/// The PyPI wheel keeps libtorch in `site-packages/torch/lib` and the CUDA libraries it
/// needs in `site-packages/nvidia/*/lib`. The CPU set-up installs only the CUDA runtime
/// (`nvidia/cu13`); cuDNN, which libtorch_cuda also needs, comes only with the full wheel.
fn cuda_libraries_present(lib: &Path) -> bool {
    if !lib.join("libtorch_cuda.so").exists() {
        return false;
    }
    let site = lib.parent().and_then(Path::parent);
    site.is_some_and(|s| s.join("nvidia/cudnn/lib").is_dir())
}
