//! The aggregator as a separate process for the crash tests (same code as `tessera-server`).

fn main() -> std::process::ExitCode {
    tessera_server::cli::main()
}
