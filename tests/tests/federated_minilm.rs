//! Federated LoRA fine-tuning for real, in CI: three institutions split the drug reviews
//! by condition, fine-tune all-MiniLM-L6-v2 with FFA-LoRA locally (tch, CPU), add their
//! DP noise shares and submit through secure aggregation over TLS. After two rounds the
//! global adapter's held-out loss is lower than the initial model's, and the server's
//! accountant reports the ε spent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tessera_client::train::data::{read_jsonl, Example};
use tessera_client::train::federated::{prepare_for_round, split_by_group, Institution, ModelSpec};
use tessera_client::train::trainer::TrainConfig;
use tessera_client::train::{data_root, LoraConfig, LoraMode};
use tessera_client::{participate, Api, Options, Participation};
use tessera_secagg::dp::DpParams;
use tessera_server::config::RoundParams;
use tessera_tests::*;

const N: usize = 3;
const ROUNDS: u64 = 2;

fn lora() -> LoraConfig {
    LoraConfig { r: 4, alpha: 16.0, dropout: 0.0, target_modules: vec!["query".into(), "value".into()], mode: LoraMode::Ffa, seed: 2026 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_institutions_lower_held_out_loss() {
    let data = data_root();
    let model = data.join("minilm");
    assert!(model.join("model.safetensors").exists(), "{} missing: run scripts/setup first", model.display());
    let (shards, groups) = split_by_group(&data.join("drugreview/train.jsonl"), N).unwrap();
    // Keep CI quick: at most 64 training reviews per institution, 96 held-out reviews.
    let test_all: Vec<Example> = read_jsonl(&data.join("drugreview/test.jsonl")).unwrap().into_iter().take(96).collect();
    let train_cfg = TrainConfig { steps: 8, batch_size: 8, lr: 3e-3, warmup: 0.1, log_every: 0, ..TrainConfig::default() };
    let mut insts: Vec<Institution> = shards
        .iter()
        .enumerate()
        .map(|(i, shard)| {
            let shard: Vec<Example> = shard.iter().take(64).cloned().collect();
            let spec = ModelSpec { dir: model.clone(), lora: lora(), num_labels: 3, max_len: 64, dtype: Default::default() };
            Institution::new(&format!("institution-{i}"), &spec, &shard, &test_all, TrainConfig { seed: i as u64, ..train_cfg.clone() }).unwrap()
        })
        .collect();
    assert!(groups.iter().all(|g| !g.is_empty()), "every institution has its own conditions: {groups:?}");
    let layout = insts[0].layout();
    let m: u64 = layout.iter().map(|t| t.numel()).sum();
    assert_eq!(m, 6 * 2 * 384 * 4 + 3 * 384 + 3, "FFA-LoRA sends B of query/value in 6 layers, and the head");

    let dp = DpParams { noise_multiplier: 0.05, l2_clip: 2.0, delta: 1e-5, epsilon_budget: 1e6, colluders: 1, skellam: None };
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), N);
    let params = RoundParams { layout, clip: 2.7, max_weight: 1, phase_timeout_ms: 60_000, min_survivors: 2, dp: Some(dp), ..RoundParams::default() };
    let server = tessera_server::spawn(server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, ROUNDS)).await.unwrap();
    let url = format!("https://{}", server.addr);

    let initial = insts[0].evaluate(&insts[0].test);
    for round in 1..=ROUNDS {
        // Local training, all institutions at once, off the async runtime.
        let mut trained = Vec::new();
        for inst in insts.drain(..) {
            trained.push(tokio::task::spawn_blocking(move || {
                let mut inst = inst;
                let update = inst.local_update(round).unwrap();
                (inst, update)
            }));
        }
        let mut updates = Vec::new();
        for t in trained {
            let (inst, update) = t.await.unwrap();
            assert!(update.delta.iter().any(|&x| x != 0.0), "training moved the adapter");
            insts.push(inst);
            updates.push(update.delta);
        }
        let mut tasks = Vec::new();
        for ((dir, _), delta) in ids.iter().zip(updates) {
            let identity = tessera_client::Identity::load(dir).unwrap();
            let api = Api::new(&url, server.fingerprint).unwrap();
            let opts = Options { insecure_dev: true, round: Some(round), quiet: true, wait: Duration::from_secs(120), ..Options::default() };
            tasks.push(tokio::spawn(async move {
                participate(&api, &identity, &opts, move |cfg| {
                    let mut delta = delta;
                    let norm = prepare_for_round(&mut delta, cfg).expect("the round has DP");
                    assert!(norm.is_finite());
                    Ok((delta, 1))
                })
                .await
            }));
        }
        let mut means = Vec::new();
        for t in tasks {
            match t.await.unwrap().unwrap() {
                Participation::Completed(r) => means.push(r.release.mean),
                Participation::Dropped { .. } => unreachable!(),
            }
        }
        assert!(means.iter().all(|m| m == &means[0]));
        for inst in &mut insts {
            inst.apply_mean(&means[0]).unwrap();
        }
    }
    let fin = insts[0].evaluate(&insts[0].test);
    assert!(fin.loss < initial.loss, "held-out loss {:.4} -> {:.4}", initial.loss, fin.loss);
    // Every institution holds the same global adapter.
    let g0 = insts[0].adapter.flatten_update().unwrap();
    assert!(insts.iter().all(|i| i.adapter.flatten_update().unwrap() == g0));

    let privacy: serde_json::Value = Api::new(&url, server.fingerprint).unwrap().with_bearer(ADMIN_TOKEN).get_json("/v1/privacy").await.unwrap();
    assert_eq!(privacy["rounds_released"], 2);
    let eps = privacy["epsilon_spent"].as_f64().unwrap();
    assert!((eps - tessera_secagg::dp::epsilon(0.05, 2, 1e-5)).abs() < 1e-9, "{privacy}");
    eprintln!("held-out loss {:.4} -> {:.4}, accuracy {:.3} -> {:.3}, ε = {eps:.1}", initial.loss, fin.loss, initial.accuracy, fin.accuracy);
    server.stop().await;
}

/// A buffered federation with the real CLI: cohorts of K = 3 among 4 institutions. Three
/// take part in cohorts 1 and 2 (versions 0 and 1); the fourth, `tessera-client federate`
/// on MiniLM, trained from version 0 and joins cohort 3 (version 2) two versions stale.
/// It is weighed down, accepted, and then applies the releases of the two cohorts it was
/// not part of before cohort 3's: its saved global adapter's LoRA B factors (zero at the
/// start under FFA) are exactly the sum of the three releases, bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_institution_catches_up_on_the_cohorts_it_missed() {
    use tessera_server::config::CohortParams;
    let data = data_root();
    let model = data.join("minilm");
    assert!(model.join("model.safetensors").exists(), "{} missing: run scripts/setup first", model.display());
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 4);
    let model_flags = ["--model".to_string(), model.display().to_string(), "--max-len".into(), "48".into()];
    let out = std::process::Command::new(client_bin()).arg("layout").args(&model_flags).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let layout: Vec<tessera_secagg::config::TensorSpec> = serde_json::from_slice(&out.stdout).unwrap();
    let m: usize = layout.iter().map(|t| t.numel() as usize).sum();
    let params = RoundParams {
        layout: layout.clone(),
        clip: 0.05,
        max_weight: 1000,
        phase_timeout_ms: 60_000,
        cohort: Some(CohortParams { size: 3, max_staleness: 2, staleness_exponent: 0.5 }),
        ..RoundParams::default()
    };
    let server = tessera_server::spawn(server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, 3)).await.unwrap();
    let url = format!("https://{}", server.addr);
    let lib_cohort = |round: u64, who: Vec<usize>, base: u64| {
        let (url, fingerprint) = (url.clone(), server.fingerprint);
        let dirs: Vec<std::path::PathBuf> = who.iter().map(|&i| ids[i].0.clone()).collect();
        async move {
            let mut tasks = Vec::new();
            for (k, dir) in dirs.into_iter().enumerate() {
                let identity = tessera_client::Identity::load(&dir).unwrap();
                let api = Api::new(&url, fingerprint).unwrap();
                let opts = Options {
                    insecure_dev: true,
                    round: Some(round),
                    quiet: true,
                    wait: Duration::from_secs(120),
                    base_version: Some(base),
                    ..Options::default()
                };
                let update: Vec<f32> = synthetic_update(k, round, m).iter().map(|x| x * 0.01).collect();
                tasks.push(tokio::spawn(async move { participate(&api, &identity, &opts, move |_| Ok((update, 100))).await }));
            }
            let mut means = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    Ok(Participation::Completed(r)) => means.push(r.release.mean),
                    other => panic!("round {round}: {other:?}"),
                }
            }
            means
        }
    };
    let mut releases = vec![lib_cohort(1, vec![0, 1, 2], 0).await.remove(0), lib_cohort(2, vec![0, 1, 2], 1).await.remove(0)];

    // The slow institution trained from version 0 and joins now, with two of the others.
    let dir = &ids[3].0;
    let shard: String = std::fs::read_to_string(data.join("drugreview/train.jsonl")).unwrap().lines().take(16).map(|l| format!("{l}\n")).collect();
    let held_out: String = std::fs::read_to_string(data.join("drugreview/test.jsonl")).unwrap().lines().take(8).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("train.jsonl"), shard).unwrap();
    std::fs::write(dir.join("test.jsonl"), held_out).unwrap();
    let fingerprint = hex::encode(server.fingerprint);
    let mut slow = tokio::process::Command::new(client_bin());
    slow.args(["federate", "--insecure-dev", "--server", &url, "--fingerprint", &fingerprint])
        .args(&model_flags)
        .args(["--rounds", "1", "--steps", "2", "--batch-size", "4", "--threads", "1", "--wait", "120"])
        .arg("--dir")
        .arg(dir)
        .arg("--train")
        .arg(dir.join("train.jsonl"))
        .arg("--test")
        .arg(dir.join("test.jsonl"))
        .arg("--report")
        .arg(dir.join("report.jsonl"))
        .arg("--adapter-out")
        .arg(dir.join("global-adapter"));
    let slow = slow.output();
    let (slow, third) = tokio::join!(slow, lib_cohort(3, vec![0, 1], 2));
    let slow = slow.unwrap();
    let log = String::from_utf8_lossy(&slow.stderr);
    assert!(slow.status.success(), "{log}");
    releases.push(third[0].clone());
    assert!(log.contains("2 version(s) stale, weighed by 0.5774"), "{log}");
    assert!(log.contains("applied 2 release(s) of cohorts this institution was not part of"), "{log}");
    let report: serde_json::Value = serde_json::from_str(std::fs::read_to_string(dir.join("report.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!((report["round"].as_u64(), report["staleness"].as_u64(), report["global_version"].as_u64()), (Some(3), Some(2), Some(3)));

    // FFA: B starts at zero and FedAvg adds each release, in order.
    let saved = tessera_client::update::read_tensors(&dir.join("global-adapter/adapter_model.safetensors")).unwrap();
    let mut want = vec![0f32; m];
    for r in &releases {
        want.iter_mut().zip(r.iter()).for_each(|(w, x)| *w += x);
    }
    let mut at = 0;
    let mut compared = 0;
    for t in &layout {
        let n = t.numel() as usize;
        if t.name.contains("lora_B") {
            let (_, values) = &saved[&t.module_name()];
            assert_eq!(&values[..], &want[at..at + n], "{}", t.name);
            compared += n;
        }
        at += n;
    }
    assert!(compared > 0 && releases.iter().all(|r| r.iter().any(|&x| x != 0.0)));
    server.stop().await;
}
