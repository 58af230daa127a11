//! Load harness: N institutions as async tasks in this process, each with its own
//! identity, real TLS and the real protocol, against a real `tessera-server` process on
//! loopback. Reports the round's wall time, the server's CPU seconds and peak RSS, the
//! server's latency quantiles per endpoint and every error.
//!
//! ```text
//! cargo build --release -p tessera-server -p tessera-tests --bins
//! target/release/tessera-load --n 100,300 --m 100000 --dropout 0.1
//! ```
//!
//! Updates are synthetic (no training): this measures the protocol and the server.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tessera_client::{participate, Api, DropPoint, Options, Participation};
use tessera_server::config::RoundParams;
use tessera_tests::{institutions, server_config, synthetic_update};

#[derive(Parser)]
#[command(about = "N institutions against one tessera-server process, real TLS on loopback")]
struct Args {
    /// Institution counts, one round each.
    #[arg(long, value_delimiter = ',', default_values_t = vec![100])]
    n: Vec<usize>,
    /// Parameters per update.
    #[arg(long, default_value_t = 100_000)]
    m: u32,
    /// Fraction of institutions that leave after sharing their keys.
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// Seconds each institution waits for the round at most.
    #[arg(long, default_value_t = 600)]
    wait: u64,
    /// Milliseconds a phase after key advertisement waits for stragglers: with dropouts,
    /// the masked-input phase always waits this long.
    #[arg(long, default_value_t = 3_000)]
    phase_timeout_ms: u64,
    /// The aggregator binary (default: `tessera-server` beside this one).
    #[arg(long)]
    server_bin: Option<std::path::PathBuf>,
    /// Keep the server's state in a fresh database on this PostgreSQL server (an admin
    /// URL such as `scripts/postgres start` prints) instead of SQLite.
    #[arg(long)]
    postgres: Option<String>,
    /// The server's log filter (`RUST_LOG`); its log goes to this process's stderr.
    #[arg(long, default_value = "error")]
    server_log: String,
    /// Threads each institution masks with (all of them share this machine's cores).
    #[arg(long, default_value_t = 1)]
    mask_threads: usize,
}

/// (user + system CPU seconds, peak RSS in bytes) of a process, from /proc.
fn usage(pid: u32) -> (f64, u64) {
    let ticks =
        Command::new("getconf").arg("CLK_TCK").output().ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok()).unwrap_or(100.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let cpu = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0) + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (cpu / ticks, hwm * 1024)
}

async fn one(n: usize, args: &Args) -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let ids = institutions(root.path(), n);
    let port = tessera_tests::free_port();
    // Key advertisement waits for everyone to start; later phases close after
    // `--phase-timeout` without the dropped institutions.
    let params = RoundParams {
        vector_len: args.m,
        clip: 1.0,
        max_weight: 1000,
        phase_timeout_ms: args.phase_timeout_ms,
        advertise_timeout_ms: 300_000,
        ..RoundParams::default()
    };
    let mut cfg = server_config(&root.path().join("server"), format!("127.0.0.1:{port}").parse()?, &ids, params, 1);
    if let Some(admin) = &args.postgres {
        cfg.store = Some(tessera_server::store::create_database(admin, "load").await.map_err(anyhow::Error::msg)?);
    }
    let config_path = root.path().join("server.toml");
    std::fs::write(&config_path, toml::to_string(&cfg).context("server.toml")?)?;
    let server_bin = match &args.server_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("tessera-server"),
    };
    if !server_bin.exists() {
        bail!("{} is missing: cargo build --release -p tessera-server", server_bin.display());
    }
    let server = tessera_tests::ServerProcess::start(&server_bin, &config_path, &args.server_log)?;
    let (pid, fingerprint) = (server.child.id(), server.fingerprint);
    let url = format!("https://127.0.0.1:{port}");
    let (cpu_before, _) = usage(pid);
    let drops = ((n as f64) * args.dropout).round() as usize;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate() {
        let identity = tessera_client::Identity::load(dir)?;
        let api = Api::new(&url, fingerprint)?;
        let drop_after = (i < drops).then_some(DropPoint::AfterShareKeys);
        let opts = Options {
            insecure_dev: true,
            round: Some(1),
            quiet: true,
            wait: Duration::from_secs(args.wait),
            drop_after,
            mask_threads: Some(args.mask_threads),
            ..Options::default()
        };
        let m = args.m as usize;
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let out = participate(&api, &identity, &opts, move |_| Ok((synthetic_update(i, 1, m), 10))).await;
            (out, t.elapsed(), api.connection_counts())
        }));
    }
    let (mut completed, mut dropped, mut errors) = (0usize, 0usize, Vec::new());
    let (mut handshakes, mut requests) = (0u64, 0u64);
    let mut latencies = Vec::new();
    for t in tasks {
        let (out, took, (h, r)) = t.await?;
        handshakes += h;
        requests += r;
        match out {
            Ok(Participation::Completed(_)) => {
                completed += 1;
                latencies.push(took.as_secs_f64());
            }
            Ok(Participation::Dropped { .. }) => dropped += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu_after, peak_rss) = usage(pid);
    let metrics = String::from_utf8(Api::new(&url, fingerprint)?.get_bytes("/metrics").await?.to_vec())?;
    // Less the one this metrics read made.
    let server_handshakes = tessera_tests::metric(&metrics, "tessera_tls_handshakes_total").unwrap_or(0).saturating_sub(1);
    drop(server);
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    let cpu = cpu_after - cpu_before;
    println!(
        "\nstore: {}; n = {n}, m = {}, {drops} dropped after sharing keys: round {wall:.2} s (of which the masked-input phase waits {:.1} s for the dropped); {completed} completed, {dropped} dropped as planned, {} errors",
        if args.postgres.is_some() { "PostgreSQL" } else { "SQLite" },
        args.m,
        if drops > 0 { args.phase_timeout_ms as f64 / 1e3 } else { 0.0 },
        errors.len()
    );
    println!(
        "server: {cpu:.2} CPU s ({:.1} ms per institution), peak RSS {:.1} MiB ({:.2} × m·4), {server_handshakes} TLS handshakes; clients: {requests} requests over {handshakes} TLS handshakes; per-institution time p50 {:.2} s, p99 {:.2} s",
        1e3 * cpu / n as f64,
        peak_rss as f64 / (1 << 20) as f64,
        peak_rss as f64 / (4.0 * f64::from(args.m)),
        pct(0.5),
        pct(0.99)
    );
    println!("| endpoint | requests | p50 | p99 | 4xx/5xx |\n|---|---:|---:|---:|---:|");
    let mut rows: std::collections::BTreeMap<String, [String; 4]> = Default::default();
    for l in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = l.rsplit_once(' ') else { continue };
        let Some(route) = key.split("route=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let method = key.split("method=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("");
        let row = rows.entry(format!("{method} {route}")).or_default();
        let slot = if key.contains("quantile=\"0.5\"") {
            0
        } else if key.contains("quantile=\"0.99\"") {
            1
        } else if key.starts_with("tessera_http_request_duration_seconds_count") {
            2
        } else if key.starts_with("tessera_http_request_errors_total") {
            3
        } else {
            continue;
        };
        row[slot] = value.to_string();
    }
    for (route, [p50, p99, count, errs]) in rows {
        let ms = |s: &str| s.parse::<f64>().map(|v| format!("{:.1} ms", v * 1e3)).unwrap_or_default();
        println!("| {route} | {count} | {} | {} | {errs} |", ms(&p50), ms(&p99));
    }
    for e in errors.iter().take(5) {
        println!("error: {e}");
    }
    if !errors.is_empty() {
        bail!("{} of {n} institutions failed the round", errors.len());
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()));
    println!(
        "tessera-load: {} cores ({}); reads long-poll, one kept-alive connection per institution",
        tessera_secagg::prg::default_threads(),
        cpu.unwrap_or_default()
    );
    for &n in &args.n {
        one(n, &args).await?;
    }
    println!("\nLatency quantiles include parked long-polls (GETs wait up to 20 s for their phase) and 425 answers count as 4xx.");
    Ok(())
}
