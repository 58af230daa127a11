//! `tessera-demo`: a full federated run on this machine. It starts the aggregator and
//! several institutions as separate processes talking TLS on loopback. Each round, every
//! institution trains locally on its own non-IID shard, and its `tessera-client submit`
//! process masks and submits the update. The demo then applies the released mean to the
//! global model and evaluates it on held-out data.
//!
//! Local training here is multinomial logistic regression by SGD on synthetic data;
//! LoRA fine-tuning of a language model with tch arrives with its own issue and plugs
//! into the same submit path.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
#[command(name = "tessera-demo", about = "Run a federated training demo: aggregator + institutions over TLS on this machine")]
struct Args {
    #[arg(long, default_value_t = 5)]
    institutions: usize,
    #[arg(long, default_value_t = 4)]
    rounds: u64,
    /// Working directory (recreated).
    #[arg(long, default_value = ".tessera-demo")]
    workdir: PathBuf,
    /// Institution that leaves round 2 after sharing its keys, to show dropout recovery (-1: none).
    #[arg(long, default_value_t = 1)]
    dropout: i64,
}

const FEATURES: usize = 16;
const CLASSES: usize = 4;

struct Shard {
    x: Vec<[f32; FEATURES]>,
    y: Vec<usize>,
}

/// Gaussian blobs, one per class; institutions see skewed class mixes (non-IID).
fn make_data(rng: &mut ChaCha8Rng, institutions: usize) -> (Vec<Shard>, Shard) {
    let centres: Vec<[f32; FEATURES]> = (0..CLASSES).map(|_| std::array::from_fn(|_| rng.gen_range(-1.5..1.5))).collect();
    let sample = |class: usize, rng: &mut ChaCha8Rng| -> [f32; FEATURES] {
        std::array::from_fn(|f| centres[class][f] + (rng.gen::<f32>() + rng.gen::<f32>() + rng.gen::<f32>() - 1.5) * 4.0)
    };
    let shards = (0..institutions)
        .map(|i| {
            let n = 150 + 90 * i;
            let mut shard = Shard { x: Vec::new(), y: Vec::new() };
            for _ in 0..n {
                // 70% of an institution's examples come from its "own" class.
                let class = if rng.gen::<f32>() < 0.7 { i % CLASSES } else { rng.gen_range(0..CLASSES) };
                shard.x.push(sample(class, rng));
                shard.y.push(class);
            }
            shard
        })
        .collect();
    let mut test = Shard { x: Vec::new(), y: Vec::new() };
    for k in 0..2000 {
        let class = k % CLASSES;
        test.x.push(sample(class, rng));
        test.y.push(class);
    }
    (shards, test)
}

/// Parameters: weight [CLASSES x FEATURES] then bias [CLASSES].
const PARAMS: usize = CLASSES * FEATURES + CLASSES;

fn logits(p: &[f32], x: &[f32; FEATURES]) -> [f32; CLASSES] {
    std::array::from_fn(|c| p[CLASSES * FEATURES + c] + (0..FEATURES).map(|f| p[c * FEATURES + f] * x[f]).sum::<f32>())
}

fn softmax(z: [f32; CLASSES]) -> [f32; CLASSES] {
    let m = z.iter().copied().fold(f32::MIN, f32::max);
    let e: [f32; CLASSES] = std::array::from_fn(|c| (z[c] - m).exp());
    let s: f32 = e.iter().sum();
    std::array::from_fn(|c| e[c] / s)
}

fn evaluate(p: &[f32], d: &Shard) -> (f32, f32) {
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for (x, &y) in d.x.iter().zip(&d.y) {
        let prob = softmax(logits(p, x));
        loss -= (prob[y].max(1e-9) as f64).ln();
        let pred = (0..CLASSES).max_by(|&a, &b| prob[a].total_cmp(&prob[b])).unwrap_or(0);
        correct += (pred == y) as usize;
    }
    ((loss / d.x.len() as f64) as f32, correct as f32 / d.x.len() as f32)
}

/// Two epochs of minibatch SGD from the global parameters; returns the delta.
fn train_local(global: &[f32], d: &Shard, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut p = global.to_vec();
    let lr = 0.05;
    let mut order: Vec<usize> = (0..d.x.len()).collect();
    for _ in 0..2 {
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), rng);
        for batch in order.chunks(16) {
            let mut grad = vec![0.0f32; PARAMS];
            for &i in batch {
                let prob = softmax(logits(&p, &d.x[i]));
                for c in 0..CLASSES {
                    let g = prob[c] - (c == d.y[i]) as u8 as f32;
                    for f in 0..FEATURES {
                        grad[c * FEATURES + f] += g * d.x[i][f];
                    }
                    grad[CLASSES * FEATURES + c] += g;
                }
            }
            for (w, g) in p.iter_mut().zip(&grad) {
                *w -= lr * g / batch.len() as f32;
            }
        }
    }
    p.iter().zip(global).map(|(a, b)| a - b).collect()
}

fn layout() -> Vec<tessera_secagg::config::TensorSpec> {
    use tessera_secagg::config::TensorSpec;
    vec![
        TensorSpec { name: "classifier.weight".into(), shape: vec![CLASSES as u64, FEATURES as u64] },
        TensorSpec { name: "classifier.bias".into(), shape: vec![CLASSES as u64] },
    ]
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("executable has no directory")?.join(name);
    if !path.exists() {
        bail!("{} not found next to tessera-demo; build it with `cargo build --release --bins`", path.display());
    }
    Ok(path)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let (server_bin, client_bin) = (bin("tessera-server")?, bin("tessera-client")?);
    let work = &args.workdir;
    if work.exists() {
        std::fs::remove_dir_all(work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    std::fs::create_dir_all(work)?;
    println!("Tessera demo: {} institutions, {} rounds, aggregator over TLS on 127.0.0.1 (workdir {})", args.institutions, args.rounds, work.display());
    println!("NOTE: dev mode — attestation is SIMULATED and the sealing key is a file. Local model: multinomial logistic regression ({PARAMS} parameters) on synthetic non-IID data.\n");

    // 1. Each institution creates its identity with the real CLI.
    let mut institutions_toml = String::new();
    let inst_dir = |i: usize| work.join(format!("institution-{i}"));
    for i in 0..args.institutions {
        let out = Command::new(&client_bin).args(["init", "--name", &format!("clinic-{i}"), "--dir"]).arg(inst_dir(i)).stderr(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("tessera-client init failed for institution {i}");
        }
        institutions_toml.push_str(&String::from_utf8_lossy(&out.stdout));
    }

    // 2. The operator's configuration: these institutions, rounds opened on schedule.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let layout_toml: String = layout().iter().map(|t| format!("[[rounds.params.layout]]\nname = \"{}\"\nshape = {:?}\n", t.name, t.shape)).collect();
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\ndata_dir = \"server-data\"\nadmin_token = \"{}\"\ndev_insecure = true\n\n[node_policy]\nallow_insecure_dev = true\n\n\
         [rounds]\nauto_open = true\ncount = {}\n\n[rounds.params]\nclip = 1.0\nmax_weight = 4096\nphase_timeout_ms = 8000\n\n{layout_toml}\n{institutions_toml}",
        hex::encode(rand::random::<[u8; 16]>()),
        args.rounds
    );
    let config_path = work.join("server.toml");
    std::fs::write(&config_path, config)?;

    // 3. The aggregator.
    let mut child =
        Command::new(&server_bin).args(["run", "--config"]).arg(&config_path).env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let server = Server(child);
    let fingerprint = line.split("fingerprint=").nth(1).map(str::trim).context("aggregator did not start")?.to_string();
    let url = format!("https://127.0.0.1:{port}");
    println!("aggregator up at {url}, TLS public key {}… (institutions pin it and check its evidence in every handshake)\n", &fingerprint[..16]);

    // 4. Rounds.
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let (shards, test) = make_data(&mut rng, args.institutions);
    let mut global = vec![0.0f32; PARAMS];
    let (loss0, acc0) = evaluate(&global, &test);
    println!("{:>5} | {:>8} | {:>9} | {:>13} | {:>12} | {:>8} | {:>7}", "round", "included", "dropouts", "held-out loss", "accuracy", "MB sent", "time s");
    println!("{:>5} | {:>8} | {:>9} | {:>13.4} | {:>11.1}% | {:>8} | {:>7}", 0, "-", "-", loss0, acc0 * 100.0, "-", "-");
    for round in 1..=args.rounds {
        let t0 = Instant::now();
        let mut children = Vec::new();
        for (i, shard) in shards.iter().enumerate() {
            let delta = train_local(&global, shard, &mut rng);
            let update = inst_dir(i).join(format!("update-round-{round}.safetensors"));
            tessera_client::update::save_flat(&update, &delta, &layout())?;
            let mut cmd = Command::new(&client_bin);
            cmd.args([
                "submit",
                "--insecure-dev",
                "--server",
                &url,
                "--fingerprint",
                &fingerprint,
                "--round",
                &round.to_string(),
                "--weight",
                &shard.x.len().to_string(),
                "--dir",
            ])
            .arg(inst_dir(i))
            .arg("--update")
            .arg(&update)
            .arg("--out")
            .arg(inst_dir(i).join(format!("global-delta-round-{round}.safetensors")))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(inst_dir(i).join(format!("round-{round}.log")))?);
            let dropping = round == 2 && args.dropout >= 0 && i as i64 == args.dropout;
            if dropping {
                cmd.args(["--drop-after", "after-share-keys"]);
            }
            children.push((i, dropping, cmd.spawn()?));
        }
        let (mut included, mut bytes, mut mean_path) = (0usize, 0u64, None);
        for (i, dropping, child) in children {
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("institution {i} failed in round {round}; see {}", inst_dir(i).join(format!("round-{round}.log")).display());
            }
            if !dropping {
                let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("client report")?;
                included = report["included"].as_array().map(Vec::len).unwrap_or(0);
                bytes += report["bytes_sent"].as_u64().unwrap_or(0);
                mean_path = Some(inst_dir(i).join(format!("global-delta-round-{round}.safetensors")));
            }
        }
        let mean = tessera_client::update::load_update(&mean_path.context("no institution completed the round")?, None, &layout(), PARAMS as u64)?;
        global.iter_mut().zip(&mean).for_each(|(g, d)| *g += d);
        let (loss, acc) = evaluate(&global, &test);
        println!(
            "{:>5} | {:>8} | {:>9} | {:>13.4} | {:>11.1}% | {:>8.3} | {:>7.1}",
            round,
            format!("{included}/{}", args.institutions),
            args.institutions - included,
            loss,
            acc * 100.0,
            bytes as f64 / 1e6,
            t0.elapsed().as_secs_f64()
        );
    }
    drop(server);
    println!("\nEvery update left its institution masked; the aggregator released only the signed weighted mean of each round.");
    println!(
        "Logs: {}/institution-*/round-*.log; aggregator state: {}/server-data. Total {:.1} s.",
        work.display(),
        work.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
