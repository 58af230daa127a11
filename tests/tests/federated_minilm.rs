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
            let spec = ModelSpec { dir: model.clone(), lora: lora(), num_labels: 3, max_len: 64 };
            Institution::new(&format!("institution-{i}"), &spec, &shard, &test_all, TrainConfig { seed: i as u64, ..train_cfg.clone() }).unwrap()
        })
        .collect();
    assert!(groups.iter().all(|g| !g.is_empty()), "every institution has its own conditions: {groups:?}");
    let layout = insts[0].layout();
    let m: u64 = layout.iter().map(|t| t.numel()).sum();
    assert_eq!(m, 6 * 2 * 384 * 4 + 3 * 384 + 3, "FFA-LoRA sends B of query/value in 6 layers, and the head");

    let dp = DpParams { noise_multiplier: 0.05, l2_clip: 2.0, delta: 1e-5, epsilon_budget: 1e6, colluders: 1 };
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
