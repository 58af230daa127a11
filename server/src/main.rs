//! `tessera-server`: runs the aggregator host. See `tessera_server::cli`.

fn main() -> std::process::ExitCode {
    tessera_server::malloc::fix_mmap_threshold();
    tessera_server::cli::main()
}
