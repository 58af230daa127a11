//! SecAgg+ cost benchmark: client masking, aggregator folding and unmasking, each stated
//! as a multiple of the raw AES-CTR keystream bound, and the aggregator's peak memory.
//!
//! ```text
//! cargo bench -p tessera-secagg --bench masking                 # m = 1_000_000 and 6_815_744, n = 100
//! cargo bench -p tessera-secagg --bench masking -- --quick      # m = 100_000 smoke run
//! cargo bench -p tessera-secagg --bench masking -- --m 250000 --n 50
//! cargo bench -p tessera-secagg --bench masking -- --compare m=1000000,n=100,k=46   # one JSON line
//! cargo bench -p tessera-secagg --bench masking -- --threads-scan   # kernel vs keystream bound and OpenSSL, 1, 2, … threads
//! cargo bench -p tessera-secagg --bench masking -- --stream          # the aggregator folds each input from a spooled file
//! cargo bench -p tessera-secagg --bench masking -- --threads 1      # the whole round on one core
//! ```
//!
//! No criterion and no global allocator (the workspace denies `unsafe`, so a counting
//! `GlobalAlloc` is impossible). Instead one whole round is driven per `m` with the
//! aggregator in a *child process* (this binary re-executed with `--aggregator-child`):
//! the parent plays the `n` clients and ships every message over a pipe, in the wire
//! encodings of `tessera_secagg::wire`, so the child's `VmHWM` (read from
//! `/proc/self/status`, and reset between phases by writing `5` to
//! `/proc/self/clear_refs`) is the aggregator's own peak resident memory: its state, the
//! running sum, and the one masked input being received and folded. Each client's
//! masked input is encoded, sent and dropped immediately, as a server would stream it.
//!
//! Times are wall-clock (`std::time::Instant`). Per-client operations are sampled once
//! per surviving client and reported as the median. The keystream bound is measured in
//! the same run, interleaved with the work it bounds so that both see the same machine
//! load: right after each client's masking the parent times the bare kernel
//! (`prg::apply_masks` with k+1 fresh streams on a scratch vector), `prg::keystream` over
//! (k+1)·4(m+1) bytes, and one 4(m+1)-byte stream; the "× bound" column is the median of
//! the per-client ratios. The unmasking (one `advance()` per round) is compared with
//! `prg::keystream` over its own number of streams, measured just before and just after
//! it (mean of the two). The fold breakdown (SHA-256, Ed25519, one add pass) is timed in
//! the parent on the first `--reps` masked inputs, each the median of 3 calls.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tessera_secagg::aggregator::{Aggregator, Outcome, Phase};
use tessera_secagg::client::{Client, Trust};
use tessera_secagg::config::{default_neighbours, DEFAULT_CORRUPTION_RATE, DEFAULT_DROPOUT_RATE};
use tessera_secagg::crypto::{self, MessageSigner};
use tessera_secagg::graph::CommunicationGraph;
use tessera_secagg::prg::{self, MaskStream, Sign};
use tessera_secagg::quantize::Quantizer;
use tessera_secagg::wire::*;
use tessera_secagg::{ClientId, RoundConfig, Timestamp};

const LLAMA8B_LORA_R16_QV: usize = 6_815_744;

// ---------------------------------------------------------------------------------------
// Small statistics helper.

fn median(xs: &[f64]) -> f64 {
    assert!(!xs.is_empty(), "median of nothing");
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Runs `f` `reps` times and returns the median wall time in seconds.
fn time_median(reps: usize, mut f: impl FnMut()) -> f64 {
    let samples: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(&samples)
}

fn fmt_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

// ---------------------------------------------------------------------------------------
// /proc/self/status.

/// (VmRSS, VmHWM) in bytes.
fn vm_status() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets VmHWM to the current RSS (Linux >= 4.0). Returns whether it worked.
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------------------
// Framing between the client parent and the aggregator child: tag, u64 length, payload.

fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> io::Result<()> {
    w.write_all(&[tag])?;
    w.write_all(&(payload.len() as u64).to_le_bytes())?;
    w.write_all(payload)?;
    w.flush()
}

fn read_frame(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..9].try_into().unwrap_or([0; 8])) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

// ---------------------------------------------------------------------------------------
// The aggregator child.

fn phase_payload(agg: &Aggregator, to: Phase) -> Value {
    match to {
        Phase::ShareKeys => {
            let views: Vec<KeyDirectory> = (0..agg.config().participants() as u32).filter_map(|i| agg.key_directory(ClientId(i))).collect();
            json!({ "key_directories": views })
        }
        Phase::MaskedInput => {
            let bundles: Vec<ShareBundle> = (0..agg.config().participants() as u32).filter_map(|i| agg.share_bundle(ClientId(i))).collect();
            json!({ "share_bundles": bundles })
        }
        Phase::ConsistencyCheck => json!({ "survivor_set": agg.survivor_set() }),
        Phase::Unmasking => json!({ "unmask_request": agg.unmask_request() }),
        Phase::Finished => match agg.outcome() {
            Some(Outcome::Sum(s)) => {
                let mut h = Sha256::new();
                for w in &s.sum {
                    h.update(w.to_le_bytes());
                }
                json!({ "included": s.included, "sum_sha256": hex::encode(h.finalize()) })
            }
            other => json!({ "error": format!("{other:?}") }),
        },
        Phase::AdvertiseKeys | Phase::Aborted => json!({ "outcome": format!("{:?}", agg.outcome()) }),
    }
}

static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// `--stream`: the aggregator folds each masked input from a file it was spooled to
/// (`handle_masked_input_stream`), as a server that streams uploads to disk would, instead
/// of from the received bytes in memory.
static STREAM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn stream() -> bool {
    STREAM.get().copied().unwrap_or(false)
}

/// The threads masking and unmasking use in this run (`--threads`, default all cores).
fn threads() -> usize {
    THREADS.get().copied().unwrap_or_else(prg::default_threads)
}

fn aggregator_child() {
    let (baseline_rss, baseline_hwm) = vm_status();
    let mut r = BufReader::with_capacity(1 << 20, io::stdin().lock());
    let mut w = BufWriter::new(io::stdout().lock());
    let mut agg: Option<Aggregator> = None;
    let mut clock = 0u64;
    // Seconds spent handling each kind of message, and how many, for the breakdown.
    let mut spent: Vec<(String, u64, f64)> = Vec::new();
    loop {
        let Ok((tag, payload)) = read_frame(&mut r) else { return };
        let handled_at = Instant::now();
        let mut step: Option<String> = match tag {
            b'A' => Some("advertisement: admit, check signature".into()),
            b'S' => Some("share keys: check k ciphertexts, signature".into()),
            b'M' => Some("masked input: digest, verify, fold".into()),
            b'F' => Some("masked input from a spooled file: read, digest, fold, verify".into()),
            b'C' => Some("consistency signature: verify".into()),
            b'U' => Some("unmask shares: check, store".into()),
            _ => None,
        };
        let reply: Result<Value, String> = (|| {
            if tag == b'G' {
                let cfg: RoundConfig = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
                let mut a = Aggregator::new(cfg, aggregator_key(), Timestamp(0)).map_err(|e| e.to_string())?;
                a.set_threads(threads());
                let config_signature = hex::encode(a.config_signature());
                agg = Some(a);
                return Ok(json!({ "baseline_rss": baseline_rss, "baseline_hwm": baseline_hwm, "config_signature": config_signature }));
            }
            if tag == b'Q' {
                return Ok(json!({}));
            }
            if tag == b'T' {
                return Ok(json!({ "steps": spent }));
            }
            let a = agg.as_mut().ok_or("no round configured")?;
            let e = |e: tessera_secagg::Error| e.to_string();
            let j = |e: serde_json::Error| e.to_string();
            match tag {
                b'A' => a.handle_advertise(serde_json::from_slice(&payload).map_err(j)?).map_err(e).map(|_| json!({})),
                b'S' => a.handle_share_keys(serde_json::from_slice(&payload).map_err(j)?).map_err(e).map(|_| json!({})),
                b'C' => a.handle_consistency(serde_json::from_slice(&payload).map_err(j)?).map_err(e).map(|_| json!({})),
                b'U' => a.handle_unmask(serde_json::from_slice(&payload).map_err(j)?).map_err(e).map(|_| json!({})),
                b'M' => {
                    // As the enclave does: verify and fold straight from the received
                    // body (no decoded copy). The high-water mark is reset (to the RSS,
                    // which includes the received body) before the fold.
                    reset_hwm();
                    let (_, hwm_decode) = vm_status();
                    let t = Instant::now();
                    a.handle_masked_input_encoded(&payload).map_err(e)?;
                    let fold_s = t.elapsed().as_secs_f64();
                    let (_, hwm_fold) = vm_status();
                    drop(payload);
                    Ok(json!({ "fold_s": fold_s, "hwm_decode": hwm_decode, "hwm_fold": hwm_fold }))
                }
                b'F' => {
                    // The payload is the path of the file the body was spooled to as it
                    // arrived (by the parent, standing for the host); the aggregator folds
                    // it from there in leaves, with only the sum and one batch of leaves in
                    // memory.
                    let path = std::path::PathBuf::from(String::from_utf8(payload).map_err(|e| e.to_string())?);
                    reset_hwm();
                    let (_, hwm_decode) = vm_status();
                    let t = Instant::now();
                    let mut file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                    let folded = a.handle_masked_input_stream(&mut file).map_err(e);
                    let fold_s = t.elapsed().as_secs_f64();
                    let (_, hwm_fold) = vm_status();
                    folded?;
                    Ok(json!({ "fold_s": fold_s, "hwm_decode": hwm_decode, "hwm_fold": hwm_fold }))
                }
                b'V' => {
                    clock += a.config().phase_timeout_ms;
                    let t = Instant::now();
                    let change = a.advance(Timestamp(clock));
                    let advance_s = t.elapsed().as_secs_f64();
                    let (rss, hwm) = vm_status();
                    let Some(change) = change else { return Err("phase did not close".into()) };
                    step = Some(match change.to {
                        Phase::ShareKeys => "close phase 0, sign n key-directory views".into(),
                        Phase::MaskedInput => "close phase 1, sign n share bundles".into(),
                        Phase::ConsistencyCheck => "close phase 2, sign U3".into(),
                        Phase::Unmasking => "close phase 3, sign the unmask request".into(),
                        Phase::Finished => "unmasking: reconstruct seeds, regenerate masks".into(),
                        other => format!("close to {other:?}"),
                    });
                    let mut v = phase_payload(a, change.to);
                    v["advance_s"] = json!(advance_s);
                    v["to"] = json!(change.to);
                    v["rss"] = json!(rss);
                    v["hwm"] = json!(hwm);
                    Ok(v)
                }
                b'H' => {
                    let (rss, hwm) = vm_status();
                    Ok(json!({ "rss": rss, "hwm": hwm }))
                }
                b'R' => {
                    let ok = reset_hwm();
                    let (rss, hwm) = vm_status();
                    Ok(json!({ "reset": ok, "rss": rss, "hwm": hwm }))
                }
                _ => Err(format!("unknown frame tag {tag}")),
            }
        })();
        if let (Some(step), true) = (step, reply.is_ok()) {
            let took = handled_at.elapsed().as_secs_f64();
            match spent.iter_mut().find(|(s, _, _)| *s == step) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += took;
                }
                None => spent.push((step, 1, took)),
            }
        }
        let body = match reply {
            Ok(v) => v,
            Err(msg) => json!({ "error": msg }),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        if write_frame(&mut w, b'r', &bytes).is_err() || tag == b'Q' {
            return;
        }
    }
}

struct AggregatorProcess {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl AggregatorProcess {
    fn spawn() -> Self {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .arg("--aggregator-child")
            .arg("--threads")
            .arg(threads().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the aggregator child");
        let stdin = BufWriter::with_capacity(1 << 20, child.stdin.take().expect("child stdin"));
        let stdout = BufReader::new(child.stdout.take().expect("child stdout"));
        AggregatorProcess { child, stdin, stdout }
    }

    fn call(&mut self, tag: u8, payload: &[u8]) -> Value {
        write_frame(&mut self.stdin, tag, payload).expect("write to the aggregator child");
        let (_, reply) = read_frame(&mut self.stdout).expect("read from the aggregator child");
        let v: Value = serde_json::from_slice(&reply).expect("child reply is JSON");
        if let Some(e) = v.get("error") {
            panic!("aggregator child, frame {}: {e}", tag as char);
        }
        v
    }

    fn send_json<T: serde::Serialize>(&mut self, tag: u8, msg: &T) -> Value {
        let bytes = serde_json::to_vec(msg).expect("serialize");
        self.call(tag, &bytes)
    }

    fn advance(&mut self) -> Value {
        self.call(b'V', &[])
    }
}

impl Drop for AggregatorProcess {
    fn drop(&mut self) {
        let _ = write_frame(&mut self.stdin, b'Q', &[]);
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// One round, clients in this process.

/// Deterministic Ed25519 keys, as in the round tests.
/// The aggregator's identity key, shared by the parent and the aggregator child.
fn aggregator_key() -> Arc<ring::signature::Ed25519KeyPair> {
    Arc::new(ring::signature::Ed25519KeyPair::from_seed_unchecked(&[0xA6; 32]).expect("valid Ed25519 seed"))
}

fn signer(i: usize) -> Arc<ring::signature::Ed25519KeyPair> {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    Arc::new(ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("valid Ed25519 seed"))
}

#[derive(Clone, Debug)]
struct Spec {
    m: usize,
    n: usize,
    /// Neighbours; `None` takes the default of `RoundConfig::with_defaults`.
    k: Option<u32>,
    dropout: f64,
    reps: usize,
    /// Element width: the round's `modulus_bits`; below 32 the masked inputs are packed.
    bits: u8,
}

#[derive(Debug, Default)]
struct RoundStats {
    m: usize,
    n: usize,
    k: u32,
    share_threshold: u32,
    min_survivors: u32,
    dropped: Vec<u32>,
    quantize_s: Vec<f64>,
    mask_s: Vec<f64>,
    /// Each client's time per protocol step (phase name -> one entry per client).
    client_steps: Vec<(&'static str, Vec<f64>)>,
    /// The aggregator's time per step: (step, messages, total seconds).
    aggregator_steps: Vec<(String, u64, f64)>,
    fold_s: Vec<f64>,
    digest_s: Vec<f64>,
    digest_stream_sha2_s: Vec<f64>,
    digest_stream_ring_s: Vec<f64>,
    verify_s: Vec<f64>,
    add_pass_s: f64,
    /// Below 32 bits: the unpack-and-add of one packed body through the generic bit
    /// reader (the fold before the eight-at-a-time reader) and through `add_packed`.
    unpack_add: Option<(f64, f64)>,
    /// Per surviving client, measured right after its masking: the bare kernel, the
    /// keystream bound for k+1 streams, and one keystream stream.
    kernel_s: Vec<f64>,
    mask_bound_s: Vec<f64>,
    stream_s: Vec<f64>,
    keystream_unmask_bound_s: f64,
    load_before: String,
    load_after: String,
    unmask_s: f64,
    unmask_streams: usize,
    baseline_rss: u64,
    decode_peak: u64,
    fold_peak: u64,
    fold_end_rss: u64,
    unmask_peak: u64,
    hwm_reset_ok: bool,
    sum_ok: bool,
    round_wall_s: f64,
}

fn config_for(spec: &Spec) -> RoundConfig {
    let roster = (0..spec.n).map(|i| hex::encode(signer(i).public_key())).collect();
    let mut cfg = RoundConfig::with_defaults(1, roster, spec.m as u32, [42; 32]);
    if let Some(k) = spec.k {
        let (dk, dts) = default_neighbours(spec.n as u32, DEFAULT_DROPOUT_RATE, DEFAULT_CORRUPTION_RATE);
        cfg.neighbours = k;
        cfg.share_threshold = if k == dk { dts } else { k / 2 + 1 };
        cfg.min_survivors = cfg.min_survivors.max(cfg.share_threshold).min(spec.n as u32);
    }
    cfg.modulus_bits = spec.bits;
    // n inputs of the largest weight must not wrap the modulus.
    cfg.max_weight = cfg.max_weight.min(cfg.modulus_mask() / spec.n as u32);
    cfg.validate().expect("benchmark configuration is valid");
    cfg
}

/// SHA-256 of the little-endian words (the data digest of protocol version 1), streamed
/// through a 16 KiB buffer instead of a copy of the whole vector.
fn digest_streaming_sha2(data: &[u32]) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut buf = [0u8; 16384];
    for chunk in data.chunks(buf.len() / 4) {
        for (b, w) in buf.chunks_exact_mut(4).zip(chunk) {
            b.copy_from_slice(&w.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
    }
    h.finalize().into()
}

/// The same with `ring::digest` (already a dependency, for Ed25519).
fn digest_streaming_ring(data: &[u32]) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = [0u8; 16384];
    for chunk in data.chunks(buf.len() / 4) {
        for (b, w) in buf.chunks_exact_mut(4).zip(chunk) {
            b.copy_from_slice(&w.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// The keystream bound: `count` distinct streams of `buf.len()` bytes each, with the
/// run's thread count (`prg::keystream_bound`: AES into an L1 buffer, as `openssl speed` measures it).
fn keystreams(count: usize, buf: &mut [u8], ctr: &mut u64) {
    let seeds: Vec<[u8; 32]> = (0..count)
        .map(|_| {
            *ctr += 1;
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&ctr.to_le_bytes());
            seed
        })
        .collect();
    std::hint::black_box(prg::keystream_bound(&seeds, buf.len(), threads()));
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// A deterministic float update for client `i`, in [-1, 1].
fn update_for(i: usize, m: usize) -> Vec<f32> {
    let mut rng = ChaCha20Rng::seed_from_u64(1000 + i as u64);
    (0..m).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn run_round(spec: &Spec, verbose: bool) -> RoundStats {
    let started = Instant::now();
    let load_before = loadavg();
    let cfg = config_for(spec);
    let n = spec.n;
    let m = spec.m;
    let k = cfg.neighbours;
    let words = cfg.masked_len();
    let mut st = RoundStats { m, n, k, share_threshold: cfg.share_threshold, min_survivors: cfg.min_survivors, load_before, ..RoundStats::default() };
    let d = ((n as f64) * spec.dropout).round() as usize;
    st.dropped = (0..d).map(|j| (j * n / d.max(1)) as u32).collect();
    let dropped = |i: usize| st.dropped.contains(&(i as u32));
    let log = |s: String| {
        if verbose {
            eprintln!("[m={m}] {s}");
        }
    };
    log(format!("n={n} k={k} share_threshold={} min_survivors={} dropped={:?}", cfg.share_threshold, cfg.min_survivors, st.dropped));

    let mut aggp = AggregatorProcess::spawn();
    let g = aggp.send_json(b'G', &cfg);
    st.baseline_rss = g["baseline_rss"].as_u64().unwrap_or(0);

    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let config_signature: [u8; 64] =
        g["config_signature"].as_str().and_then(|h| hex::decode(h).ok()).and_then(|v| v.try_into().ok()).expect("config signature from the aggregator");
    // The bench measures speed at the configured thresholds, whatever an institution's floors.
    let floors = tessera_secagg::floors::SecurityFloors { min_participants: 0, min_survivor_fraction: 0.0, ..Default::default() };
    let trust = Trust { aggregator_key: aggregator_key().public_key(), config_signature, floors };
    let (mut t_setup, mut t_dir, mut t_consistency, mut t_unmask) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut clients: Vec<Client> = (0..n)
        .map(|i| {
            let t = Instant::now();
            let mut c = Client::new(cfg.clone(), ClientId(i as u32), signer(i), &trust, &mut rng).expect("client");
            let adv = c.advertise(vec![]);
            t_setup.push(t.elapsed().as_secs_f64());
            std::hint::black_box(adv);
            c.set_threads(threads());
            c
        })
        .collect();
    for c in &clients {
        aggp.send_json(b'A', &c.advertise(vec![]));
    }
    let v = aggp.advance();
    let views: Vec<KeyDirectory> = serde_json::from_value(v["key_directories"].clone()).expect("key directories");
    for (c, dir) in clients.iter_mut().zip(&views) {
        let t = Instant::now();
        let msg = c.handle_key_directory(dir, &mut rng).expect("share keys");
        t_dir.push(t.elapsed().as_secs_f64());
        aggp.send_json(b'S', &msg);
    }
    let v = aggp.advance();
    let bundles: Vec<ShareBundle> = serde_json::from_value(v["share_bundles"].clone()).expect("share bundles");
    log(format!("setup done in {:.1} s; masking {} clients", started.elapsed().as_secs_f64(), n - d));

    // Phase 2: mask, ship and drop each input in turn; the child folds it on arrival.
    let r = aggp.call(b'R', &[]);
    st.hwm_reset_ok = r["reset"].as_bool().unwrap_or(false);
    let quantizer = Quantizer::new(&cfg).expect("the bench configuration validates");
    let digest = cfg.digest();
    let mut expected = vec![0u32; words];
    let mut qrng = ChaCha20Rng::seed_from_u64(99);
    let mut ks_buf = vec![0u8; 4 * words];
    let mut ks_ctr = 0u64;
    let mut scratch = vec![1u32; words];
    for (i, client) in clients.iter_mut().enumerate() {
        if dropped(i) {
            continue; // shared its keys, then vanished before sending a masked input
        }
        let bundle = bundles.iter().find(|b| b.to == ClientId(i as u32)).expect("bundle for every client in U2");
        let update = update_for(i, m);
        let t = Instant::now();
        let input = quantizer.quantize(&update, 100.min(cfg.max_weight), &mut qrng).expect("quantize");
        st.quantize_s.push(t.elapsed().as_secs_f64());
        drop(update);
        for (e, x) in expected.iter_mut().zip(&input) {
            *e = e.wrapping_add(*x);
        }
        // The vector itself, as the client CLI passes it: masked in place.
        let t = Instant::now();
        let masked = client.handle_share_bundle(bundle, input).expect("mask");
        st.mask_s.push(t.elapsed().as_secs_f64());
        // Right after, under the same machine conditions: the bare kernel on a scratch
        // vector, the keystream bound for the same k+1 streams, and one stream.
        let t = Instant::now();
        let streams: Vec<MaskStream> = (0..=k)
            .map(|s| {
                let mut seed = [0u8; 32];
                seed[..4].copy_from_slice(&s.to_le_bytes());
                seed[4..12].copy_from_slice(&(i as u64).to_le_bytes());
                MaskStream::new(&seed, b"bench", if s.is_multiple_of(2) { Sign::Add } else { Sign::Subtract })
            })
            .collect();
        prg::apply_masks(&mut scratch, &streams, threads());
        st.kernel_s.push(t.elapsed().as_secs_f64());
        drop(streams);
        let t = Instant::now();
        keystreams(k as usize + 1, &mut ks_buf, &mut ks_ctr);
        st.mask_bound_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        keystreams(1, &mut ks_buf, &mut ks_ctr);
        st.stream_s.push(t.elapsed().as_secs_f64());
        if st.digest_s.len() < spec.reps {
            // Break the fold down (in this process, so the child's memory stays clean).
            let dd = MaskedInput::data_digest(&masked.data, masked.bits);
            st.digest_s.push(time_median(3, || {
                std::hint::black_box(MaskedInput::data_digest(&masked.data, masked.bits));
            }));
            // The plain SHA-256 of the body on one core, the digest of protocol version 1.
            std::hint::black_box((digest_streaming_sha2(&masked.data), digest_streaming_ring(&masked.data), dd));
            st.digest_stream_sha2_s.push(time_median(3, || {
                std::hint::black_box(digest_streaming_sha2(&masked.data));
            }));
            st.digest_stream_ring_s.push(time_median(3, || {
                std::hint::black_box(digest_streaming_ring(&masked.data));
            }));
            let transcript = MaskedInput::transcript_for(&digest, masked.round, masked.client, &dd, masked.record_privacy.as_ref(), masked.base_version);
            let key = signer(i).public_key();
            let t = Instant::now();
            assert!(crypto::verify_signature(&key, transcript.as_bytes(), &masked.signature));
            st.verify_s.push(t.elapsed().as_secs_f64());
        }
        let bytes = masked.encode();
        drop(masked);
        let f = if stream() {
            let path = std::env::temp_dir().join(format!("tessera-bench-input-{}.bin", std::process::id()));
            std::fs::write(&path, &bytes).expect("spool the masked input");
            drop(bytes);
            let f = aggp.call(b'F', path.to_string_lossy().as_bytes());
            let _ = std::fs::remove_file(&path);
            f
        } else {
            let f = aggp.call(b'M', &bytes);
            drop(bytes);
            f
        };
        st.fold_s.push(f["fold_s"].as_f64().unwrap_or(f64::NAN));
        st.decode_peak = st.decode_peak.max(f["hwm_decode"].as_u64().unwrap_or(0));
        st.fold_peak = st.fold_peak.max(f["hwm_fold"].as_u64().unwrap_or(0));
        if verbose && st.mask_s.len().is_multiple_of(10) {
            log(format!("{} inputs masked and folded ({:.1} s)", st.mask_s.len(), started.elapsed().as_secs_f64()));
        }
    }
    drop(scratch);
    let h = aggp.call(b'H', &[]);
    st.fold_end_rss = h["rss"].as_u64().unwrap_or(0);

    let v = aggp.advance();
    let set: SurvivorSet = serde_json::from_value(v["survivor_set"].clone()).expect("survivor set");
    // PRG streams the unmasking regenerates: one self mask per survivor, one pairwise
    // mask per (dropped, surviving neighbour) pair.
    let graph = CommunicationGraph::for_config(&cfg).expect("graph");
    let survivors = &set.survivors;
    st.unmask_streams =
        survivors.len() + st.dropped.iter().map(|&u| graph.neighbours(ClientId(u)).iter().filter(|v| survivors.contains(v)).count()).sum::<usize>();
    for c in clients.iter_mut().filter(|c| set.survivors.contains(&c.id())) {
        let t = Instant::now();
        let sig = c.handle_survivor_set(&set).expect("consistency");
        t_consistency.push(t.elapsed().as_secs_f64());
        aggp.send_json(b'C', &sig);
    }
    let v = aggp.advance();
    let req: UnmaskRequest = serde_json::from_value(v["unmask_request"].clone()).expect("unmask request");
    for c in clients.iter_mut().filter(|c| set.survivors.contains(&c.id())) {
        let t = Instant::now();
        let shares = c.handle_unmask_request(&req).expect("unmask shares");
        t_unmask.push(t.elapsed().as_secs_f64());
        aggp.send_json(b'U', &shares);
    }
    // The unmasking's keystream bound, (streams) x 4(m+1) bytes, measured right before
    // and right after it; the mean of the two is reported.
    let t = Instant::now();
    keystreams(st.unmask_streams, &mut ks_buf, &mut ks_ctr);
    let bound_before = t.elapsed().as_secs_f64();
    aggp.call(b'R', &[]);
    let v = aggp.advance();
    let t = Instant::now();
    keystreams(st.unmask_streams, &mut ks_buf, &mut ks_ctr);
    st.keystream_unmask_bound_s = (bound_before + t.elapsed().as_secs_f64()) / 2.0;
    st.unmask_s = v["advance_s"].as_f64().unwrap_or(f64::NAN);
    st.unmask_peak = v["hwm"].as_u64().unwrap_or(0);
    let included: Vec<ClientId> = serde_json::from_value(v["included"].clone()).expect("the round finished with a sum");
    let mut h = Sha256::new();
    for w in &expected {
        h.update((w & cfg.modulus_mask()).to_le_bytes());
    }
    st.sum_ok = included == set.survivors && v["sum_sha256"].as_str() == Some(&hex::encode(h.finalize()));
    st.client_steps = vec![
        ("keys and advertisement (`Client::new`, `advertise`)", t_setup),
        ("key directory: verify k+1 advertisements, deal 2k shares", t_dir),
        ("quantize the update", st.quantize_s.clone()),
        ("mask: k+1 streams over m+1 words, digest, sign", st.mask_s.clone()),
        ("consistency: sign U3", t_consistency),
        ("unmask request: verify t signatures, reveal shares", t_unmask),
    ];
    let steps = aggp.call(b'T', &[]);
    st.aggregator_steps = serde_json::from_value(steps["steps"].clone()).unwrap_or_default();
    assert!(st.sum_ok, "the released sum is not the sum of the included inputs");
    drop(aggp);
    drop(clients);
    drop(expected);
    log(format!("round done in {:.1} s, unmasking {}", started.elapsed().as_secs_f64(), fmt_time(st.unmask_s)));

    drop(ks_buf);
    let mut data = vec![1u32; words];
    // One pass of wrapping adds over m+1 words (the fold's arithmetic alone).
    let other = vec![3u32; words];
    st.add_pass_s = time_median(spec.reps.max(3), || {
        for (s, x) in data.iter_mut().zip(&other) {
            *s = s.wrapping_add(*x);
        }
        std::hint::black_box(&data);
    });
    if spec.bits < 32 {
        let mask = (1u32 << spec.bits) - 1;
        let values: Vec<u32> = (0..words as u32).map(|i| i.wrapping_mul(0x9E37_79B9) & mask).collect();
        let body = tessera_secagg::pack::pack(&values, spec.bits);
        let reps = spec.reps.max(5);
        let bit_reader = time_median(reps, || {
            for (s, v) in data.iter_mut().zip(tessera_secagg::pack::Unpacked::new(&body, words, spec.bits)) {
                *s = s.wrapping_add(v);
            }
            std::hint::black_box(&data);
        });
        let eight = time_median(reps, || {
            tessera_secagg::pack::add_packed(&mut data, &body, spec.bits);
            std::hint::black_box(&data);
        });
        st.unpack_add = Some((bit_reader, eight));
    }
    st.round_wall_s = started.elapsed().as_secs_f64();
    st.load_after = loadavg();
    st
}

// ---------------------------------------------------------------------------------------
// Reports.

/// Where the time goes, per protocol step, on each side: so the next bottleneck shows.
fn print_steps(all: &[RoundStats]) {
    println!("\n### Where the time goes, per step (client: median per client; aggregator: per message and in total)\n");
    println!("| m | n | k | side | step | per client or message | total over the round |");
    println!("|---:|---:|---:|---|---|---:|---:|");
    for s in all {
        for (step, times) in &s.client_steps {
            let total: f64 = times.iter().sum();
            println!("| {} | {} | {} | client | {step} | {} | {} ({} clients) |", s.m, s.n, s.k, fmt_time(median(times)), fmt_time(total), times.len());
        }
        for (step, count, total) in &s.aggregator_steps {
            println!("| {} | {} | {} | aggregator | {step} | {} | {} ({count}×) |", s.m, s.n, s.k, fmt_time(total / *count.max(&1) as f64), fmt_time(*total));
        }
    }
}

fn print_tables(all: &[RoundStats]) {
    println!("\n### Time (median over clients; keystream bound measured in the same run)\n");
    println!("| m | n | k | t_s | operation | time | PRG bytes | keystream bound | × bound |");
    println!("|---:|---:|---:|---:|---|---:|---:|---:|---:|");
    for s in all {
        let words = s.m + 1;
        let stream_bytes = 4 * words;
        let mb = |streams: usize| mib((streams * stream_bytes) as f64);
        let ks1 = median(&s.stream_s);
        let row_ratio = |op: &str, t: f64, bytes: String, b: String, x: String| {
            println!("| {} | {} | {} | {} | {op} | {} | {bytes} | {b} | {x} |", s.m, s.n, s.k, s.share_threshold, fmt_time(t));
        };
        let row = |op: &str, t: f64, bytes: String, bound: Option<f64>| {
            let (b, x) = match bound {
                Some(b) => (fmt_time(b), format!("{:.2}×", t / b)),
                None => ("—".into(), "—".into()),
            };
            row_ratio(op, t, bytes, b, x);
        };
        // Per-client ratio against the bound measured right after that client's masking.
        let paired = |xs: &[f64], bounds: &[f64]| -> f64 { median(&xs.iter().zip(bounds).map(|(x, b)| x / b).collect::<Vec<_>>()) };
        let kp1 = s.k as usize + 1;
        row_ratio(
            &format!("client masking: `handle_share_bundle` (1 self + {} pairwise streams, decrypt shares, SHA-256, sign)", s.k),
            median(&s.mask_s),
            mb(kp1),
            fmt_time(median(&s.mask_bound_s)),
            format!("{:.2}×", paired(&s.mask_s, &s.mask_bound_s)),
        );
        row_ratio(
            &format!("masking kernel alone: `prg::apply_masks`, {kp1} streams"),
            median(&s.kernel_s),
            mb(kp1),
            fmt_time(median(&s.mask_bound_s)),
            format!("{:.2}×", paired(&s.kernel_s, &s.mask_bound_s)),
        );
        row("client quantization (`Quantizer::quantize`, not part of masking)", median(&s.quantize_s), "—".into(), None);
        row_ratio(
            if stream() {
                "aggregator fold of one input: `handle_masked_input_stream` from a spooled file (read, SHA-256 + add per leaf, Ed25519 verify)"
            } else {
                "aggregator fold of one input: `handle_masked_input` (SHA-256 + Ed25519 verify + add)"
            },
            median(&s.fold_s),
            format!("(1 stream: {})", mb(1)),
            fmt_time(ks1),
            format!("{:.2}×", paired(&s.fold_s, &s.stream_s)),
        );
        row("  of which the data digest (`MaskedInput::data_digest`: SHA-256 tree of 1 MiB leaves, all cores)", median(&s.digest_s), "—".into(), Some(ks1));
        row("  of which Ed25519 verify of the transcript", median(&s.verify_s), "—".into(), None);
        row("  (for comparison: plain SHA-256 of the body with sha2, one core; version 1's digest)", median(&s.digest_stream_sha2_s), "—".into(), Some(ks1));
        row("  (for comparison: the same with ring)", median(&s.digest_stream_ring_s), "—".into(), Some(ks1));
        row("  of which one wrapping-add pass over m+1 words", s.add_pass_s, "—".into(), Some(ks1));
        if let Some((bit_reader, eight)) = s.unpack_add {
            row("  unpack-and-add of one packed body, eight elements per load (the fold's)", eight, "—".into(), Some(ks1));
            row("  unpack-and-add of one packed body, generic bit reader (before)", bit_reader, "—".into(), Some(ks1));
        }
        row(&format!("aggregator fold of all {} received inputs (sum of the above)", s.fold_s.len()), s.fold_s.iter().sum(), "—".into(), None);
        row(&format!("aggregator fold, n = {} inputs (n × median)", s.n), s.n as f64 * median(&s.fold_s), "—".into(), None);
        row(
            &format!(
                "unmasking: `advance()` closing Unmasking, {} dropped ({} streams: {} self + {} pairwise)",
                s.dropped.len(),
                s.unmask_streams,
                s.n - s.dropped.len(),
                s.unmask_streams - (s.n - s.dropped.len())
            ),
            s.unmask_s,
            mb(s.unmask_streams),
            Some(s.keystream_unmask_bound_s),
        );
        row("keystream reference: `prg::keystream` over one stream of 4(m+1) bytes", ks1, mb(1), None);
    }
    println!("\n### Aggregator peak memory (child process VmHWM above its RSS before `Aggregator::new`)\n");
    println!("| m | n | m·4 bytes | baseline RSS | peak decoding an input | ÷ m·4 | peak folding an input | ÷ m·4 | RSS after all folds | ÷ m·4 | peak unmasking | ÷ m·4 |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in all {
        let m4 = (s.m * 4) as f64;
        let above = |b: u64| b.saturating_sub(s.baseline_rss) as f64;
        println!(
            "| {} | {} | {} | {} | {} | {:.2}× | {} | {:.2}× | {} | {:.2}× | {} | {:.2}× |",
            s.m,
            s.n,
            mib(m4),
            mib(s.baseline_rss as f64),
            mib(above(s.decode_peak)),
            above(s.decode_peak) / m4,
            mib(above(s.fold_peak)),
            above(s.fold_peak) / m4,
            mib(above(s.fold_end_rss)),
            above(s.fold_end_rss) / m4,
            mib(above(s.unmask_peak)),
            above(s.unmask_peak) / m4,
        );
    }
    for s in all {
        if !s.hwm_reset_ok {
            println!("\nnote: /proc/self/clear_refs could not reset VmHWM; peaks for m={} are since process start", s.m);
        }
    }
    println!();
    for s in all {
        println!(
            "m={}: released sum verified exact for {} included clients; whole round incl. bounds {:.1} s; load average before {} / after {}",
            s.m,
            s.n - s.dropped.len(),
            s.round_wall_s,
            s.load_before,
            s.load_after
        );
    }
}

fn compare_json(s: &RoundStats) -> Value {
    json!({
        "impl": "tessera",
        "m": s.m,
        "n": s.n,
        "k": s.k,
        "share_threshold": s.share_threshold,
        "min_survivors": s.min_survivors,
        "dropped": s.dropped.len(),
        "client_mask_s": median(&s.mask_s),
        "client_mask_min_s": min(&s.mask_s),
        "client_mask_samples": s.mask_s.len(),
        "client_quantize_s": median(&s.quantize_s),
        "mask_kernel_s": median(&s.kernel_s),
        "fold_one_s": median(&s.fold_s),
        "server_unmask_s": s.unmask_s,
        "aggregator_peak_over_m4": (s.decode_peak.max(s.fold_peak).max(s.unmask_peak).saturating_sub(s.baseline_rss)) as f64 / (s.m * 4) as f64,
        "unmask_streams": s.unmask_streams,
        "keystream_stream_s": median(&s.stream_s),
        "keystream_mask_bound_s": median(&s.mask_bound_s),
        "load_before": s.load_before,
        "load_after": s.load_after,
        "keystream_unmask_bound_s": s.keystream_unmask_bound_s,
        "sum_ok": s.sum_ok,
    })
}

fn parse_compare(arg: &str) -> Spec {
    let mut spec = Spec { m: 1_000_000, n: 100, k: None, dropout: 0.1, reps: 3, bits: 32 };
    for kv in arg.split(',').filter(|s| !s.is_empty()) {
        let (key, val) = kv.split_once('=').unwrap_or_else(|| panic!("expected key=value, got {kv}"));
        match key.trim() {
            "m" => spec.m = val.replace('_', "").parse().unwrap_or_else(|_| panic!("bad value in {kv}")),
            "n" => spec.n = val.parse().unwrap_or_else(|_| panic!("bad value in {kv}")),
            "k" => spec.k = Some(val.parse().unwrap_or_else(|_| panic!("bad value in {kv}"))),
            "dropout" => spec.dropout = val.parse().unwrap_or_else(|_| panic!("bad value in {kv}")),
            "reps" => spec.reps = val.parse().unwrap_or_else(|_| panic!("bad value in {kv}")),
            "bits" => spec.bits = val.parse().unwrap_or_else(|_| panic!("bad value in {kv}")),
            other => panic!("unknown compare key {other}"),
        }
    }
    spec
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.iter().any(|a| a == "--aggregator-child") {
        if let Some(t) = args.iter().position(|a| a == "--threads").and_then(|i| args.get(i + 1)).and_then(|t| t.parse().ok()) {
            THREADS.set(t).ok();
        }
        aggregator_child();
        return;
    }
    let mut ms = vec![1_000_000, LLAMA8B_LORA_R16_QV];
    let mut n = 100usize;
    let mut reps = 3usize;
    let mut compare: Option<Spec> = None;
    let mut bits = 32u8;
    let mut kernels_only = false;
    let mut max_threads = prg::default_threads();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => ms = vec![100_000],
            "--threads-scan" => kernels_only = true,
            "--stream" => {
                STREAM.set(true).ok();
            }
            "--threads" => {
                let t: usize = it.next().expect("--threads N").parse().expect("threads");
                max_threads = t.max(1);
            }
            "--m" => {
                ms = it.next().expect("--m LIST").split(',').map(|s| s.replace('_', "").parse().expect("m")).collect();
            }
            "--n" => n = it.next().expect("--n N").parse().expect("n"),
            "--reps" => reps = it.next().expect("--reps R").parse().expect("reps"),
            "--bits" => bits = it.next().expect("--bits B").parse().expect("bits"),
            "--compare" => compare = Some(parse_compare(it.next().map(String::as_str).unwrap_or(""))),
            s if s.starts_with("--compare=") => compare = Some(parse_compare(&s["--compare=".len()..])),
            other => {
                eprintln!("unknown argument {other}; usage: masking [--quick] [--threads-scan] [--stream] [--threads N] [--m LIST] [--n N] [--reps R] [--bits B] [--compare m=..,n=..,k=..,bits=..]");
                std::process::exit(2);
            }
        }
    }
    THREADS.set(max_threads).ok();
    println!("{}; masking and unmasking with {} thread(s)", cpu_line(), threads());
    if stream() {
        println!("fold: each masked input streamed from a spooled file (`handle_masked_input_stream`), not from the received bytes");
    }
    if let Some(spec) = compare {
        let stats = run_round(&spec, true);
        println!("{}", compare_json(&stats));
        return;
    }
    let (k, ts) = default_neighbours(n as u32, DEFAULT_DROPOUT_RATE, DEFAULT_CORRUPTION_RATE);
    if kernels_only {
        let single = openssl_speed(1);
        let multi = openssl_speed(max_threads);
        match (single, multi) {
            (Some(a), Some(b)) => println!(
                "anchor: `openssl speed -evp aes-128-ctr -bytes 16384`: {:.2} GB/s on one core, {:.2} GB/s with -multi {max_threads}",
                a / 1e9,
                b / 1e9
            ),
            _ => println!("anchor: openssl is not installed; no OpenSSL figure"),
        }
        for &m in &ms {
            thread_scaling(m, k as usize, reps.max(5), max_threads, (single, multi));
        }
        return;
    }
    eprintln!("default_neighbours({n}, {DEFAULT_DROPOUT_RATE}, {DEFAULT_CORRUPTION_RATE}) = (k={k}, t_s={ts})");
    println!("element width: {bits} bits{}", if bits < 32 { " (masked inputs bit-packed on the wire, unpacked by the fold)" } else { "" });
    let all: Vec<RoundStats> = ms.iter().map(|&m| run_round(&Spec { m, n, k: None, dropout: 0.1, reps, bits }, true)).collect();
    print_tables(&all);
    print_steps(&all);
}

// ---------------------------------------------------------------------------------------
// `--threads-scan`: the mask kernel against the keystream bounds, 1, 2, … threads.

/// The CPU model and the features that decide the kernel's speed, as this process sees them.
fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(str::trim).unwrap_or("unknown").to_string();
    let flags: Vec<&str> = info.lines().find(|l| l.starts_with("flags")).map(|l| l.split_whitespace().collect()).unwrap_or_default();
    let wanted = ["aes", "vaes", "avx2", "avx512f", "avx512bw", "avx512vl", "sha_ni", "vpclmulqdq"];
    let have: Vec<&str> = wanted.iter().copied().filter(|f| flags.contains(f)).collect();
    format!("CPU: {model}, {} logical cores; flags {}; keystream kernel {:?}", prg::default_threads(), have.join(" "), prg::Kernel::best())
}

/// `openssl speed -evp aes-128-ctr` on 16 KiB blocks, one process and one per core, in
/// bytes per second; `None` when openssl is not installed.
fn openssl_speed(multi: usize) -> Option<f64> {
    let mut cmd = Command::new("openssl");
    cmd.args(["speed", "-evp", "aes-128-ctr", "-bytes", "16384", "-seconds", "2"]);
    if multi > 1 {
        cmd.args(["-multi", &multi.to_string()]);
    }
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "AES-128-CTR  123456.78k" (1000-byte units).
    let line = text.lines().rev().find(|l| l.to_ascii_lowercase().starts_with("aes-128-ctr"))?;
    let v = line.split_whitespace().last()?.trim_end_matches('k').parse::<f64>().ok()?;
    Some(v * 1000.0)
}

fn thread_scaling(m: usize, k: usize, reps: usize, max_threads: usize, openssl: (Option<f64>, Option<f64>)) {
    use tessera_secagg::prg::{apply_masks, keystream_bound_with, Kernel, MaskStream, Sign};
    let words = m + 1;
    let seeds: Vec<[u8; 32]> = (0..=k).map(|s| [s as u8 + 1; 32]).collect();
    let sign = |s: usize| if s.is_multiple_of(2) { Sign::Add } else { Sign::Subtract };
    let streams =
        |kernel: Kernel| -> Vec<MaskStream> { seeds.iter().enumerate().map(|(s, seed)| MaskStream::with_kernel(seed, b"x", sign(s), kernel)).collect() };
    let best = Kernel::best();
    let kernels: Vec<Kernel> = if best == Kernel::Portable { vec![best] } else { vec![best, Kernel::Portable] };
    let mut reference = vec![7u32; words];
    apply_masks(&mut reference, &streams(Kernel::Portable), 1);
    let mut threads: Vec<usize> = vec![1];
    while *threads.last().unwrap_or(&1) * 2 <= max_threads {
        threads.push(threads.last().unwrap_or(&1) * 2);
    }
    if *threads.last().unwrap_or(&1) != max_threads {
        threads.push(max_threads);
    }
    let buf = vec![0u8; 4 * words];
    let bytes = (k + 1) * 4 * words;
    println!("\n### Mask kernel and keystream, m = {m}, {} streams ({}), median of {reps} interleaved repetitions\n", k + 1, mib(bytes as f64));
    println!("OpenSSL column: the keystream bound's GB/s over `openssl speed -evp aes-128-ctr` (one process for 1 thread, `-multi` for all cores).\n");
    println!("| keystream kernel | threads | `prg::apply_masks` | GB/s | keystream bound (`keystream_bound_with`, same threads) | GB/s | kernel ÷ bound | bound ÷ OpenSSL | speed-up over 1 thread |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for kernel in kernels {
        let streams = streams(kernel);
        let mut one = f64::NAN;
        for &t in &threads {
            let mut check = vec![7u32; words];
            apply_masks(&mut check, &streams, t);
            assert_eq!(check, reference, "{kernel:?} with {t} threads differs from the portable kernel on 1");
            let (mut tk, mut tb) = (Vec::new(), Vec::new());
            let mut data = vec![7u32; words];
            for _ in 0..reps {
                let s0 = Instant::now();
                apply_masks(&mut data, &streams, t);
                tk.push(s0.elapsed().as_secs_f64());
                let s0 = Instant::now();
                std::hint::black_box(keystream_bound_with(&seeds, buf.len(), t, kernel));
                tb.push(s0.elapsed().as_secs_f64());
            }
            let (kt, bt) = (median(&tk), median(&tb));
            if t == 1 {
                one = kt;
            }
            let gbs = |s: f64| bytes as f64 / s / 1e9;
            let anchor = if t == 1 {
                openssl.0
            } else if t == max_threads {
                openssl.1
            } else {
                None
            };
            let vs = anchor.map(|a| format!("{:.2}×", bytes as f64 / bt / a)).unwrap_or_else(|| "—".into());
            println!(
                "| {kernel:?} | {t} | {} | {:.2} | {} | {:.2} | {:.2}× | {vs} | {:.2}× |",
                fmt_time(kt),
                gbs(kt),
                fmt_time(bt),
                gbs(bt),
                kt / bt,
                one / kt
            );
        }
    }
}
