#![allow(clippy::unwrap_used, clippy::expect_used)]
//! DP-SGD inside one institution: per-example gradients (the fast path against the
//! one-at-a-time reference), clipping, Poisson sampling, the noise, and training under it.
//! Needs the models of `scripts/setup`.

use std::path::PathBuf;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};
use tessera_client::train::data::{read_jsonl, Encoded};
use tessera_client::train::dpsgd::{clipped_sum, noised_mean, poisson_sample, DpSgdConfig, PerExampleMethod};
use tessera_client::train::federated::{Institution, ModelSpec, TaskModel};
use tessera_client::train::trainer::{evaluate, train_dp, Classify, TrainConfig};
use tessera_client::train::{data_root, LoraConfig, LoraMode};

fn model_dir(name: &str) -> PathBuf {
    let d = data_root().join(name);
    assert!(d.join("model.safetensors").exists(), "{} missing: run scripts/setup first", d.display());
    d
}

fn institution(model: &str, mode: LoraMode, n: usize, max_len: usize) -> Institution {
    let data = read_jsonl(&data_root().join("drugreview/train.jsonl")).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec![], mode, seed: 7 };
    let spec = ModelSpec { dir: model_dir(model), lora, num_labels: 3, max_len, dtype: Default::default() };
    let cfg = TrainConfig { log_every: 0, ..Default::default() };
    let mut inst = Institution::new("t", &spec, &data[..n], &data[..4], cfg).unwrap();
    // Move B off zero so that A's gradients are not all zero too.
    let moved: Vec<f32> = (0..inst.adapter.flatten_update().unwrap().len()).map(|i| ((i % 13) as f32 - 6.0) * 2e-3).collect();
    inst.apply_mean(&moved).unwrap();
    inst
}

fn batch_of(inst: &Institution, rows: &[Encoded]) -> tessera_client::train::data::Batch {
    let items: Vec<&Encoded> = rows.iter().collect();
    inst.encoder.batch(&items, Device::Cpu)
}

fn max_abs_diff(a: &[Tensor], b: &[Tensor]) -> (f64, f64) {
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs().max().double_value(&[])).fold(0.0, f64::max);
    (diff, scale)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// The expanded-weights path gives the reference's per-example norms and clipped sum,
/// within 1e-5, on BERT with A and B trained plus a head, and on the Llama decoder under
/// FFA-LoRA; at a clipping norm of the median, about half the examples are clipped.
fn fast_path_matches_reference(inst: &Institution) {
    let model: &dyn Classify = &inst.model;
    let batch = batch_of(inst, &inst.train);
    let probe = clipped_sum(model, &inst.adapter, &batch, 1e9, PerExampleMethod::OneByOne, false);
    let c = median(&probe.norms);
    let reference = clipped_sum(model, &inst.adapter, &batch, c, PerExampleMethod::OneByOne, false);
    let fast = clipped_sum(model, &inst.adapter, &batch, c, PerExampleMethod::Expanded, false);
    assert_eq!(fast.norms.len(), inst.train.len());
    for (f, r) in fast.norms.iter().zip(&reference.norms) {
        assert!((f - r).abs() <= 1e-5 * r.max(1.0), "per-example norm {f} vs reference {r}");
    }
    let (diff, scale) = max_abs_diff(&fast.sum, &reference.sum);
    assert!(diff <= 1e-5 * scale.max(1.0), "clipped sum differs by {diff} (largest entry {scale})");
    assert!((fast.loss - reference.loss).abs() < 1e-4 * reference.loss.abs().max(1.0));
    let clipped = fast.norms.iter().filter(|&&n| n > c).count();
    assert!(clipped >= 1 && clipped < inst.train.len(), "{clipped} of {} clipped at the median", inst.train.len());
    // The shared tensors are back in the forward pass: the plain logits are unchanged.
    let again = clipped_sum(model, &inst.adapter, &batch, c, PerExampleMethod::OneByOne, false);
    assert_eq!(max_abs_diff(&again.sum, &reference.sum).0, 0.0);
    eprintln!("per-example gradients: fast vs reference max diff {diff:e} (largest entry {scale:.3e}), C = {c:.4}");
}

#[test]
fn per_example_gradients_match_the_reference_bert() {
    let inst = institution("minilm", LoraMode::Both, 7, 48);
    assert!(matches!(inst.model, TaskModel::Bert(_)));
    assert!(inst.adapter.update_names().iter().any(|n| n.contains("lora_A")) && inst.adapter.update_names().iter().any(|n| !n.contains("lora")));
    fast_path_matches_reference(&inst);
}

#[test]
fn per_example_gradients_match_the_reference_llama() {
    let inst = institution("smollm2", LoraMode::Ffa, 5, 32);
    assert!(matches!(inst.model, TaskModel::Llama(_)));
    fast_path_matches_reference(&inst);
}

/// Each record's clipped gradient has norm at most C: a batch of one with C below its
/// norm sums to a vector of norm C (to within Opacus' 1e-6 stabiliser), and above its
/// norm, to the unclipped gradient.
#[test]
fn a_clipped_record_contributes_at_most_c() {
    let inst = institution("minilm", LoraMode::Both, 3, 48);
    let model: &dyn Classify = &inst.model;
    for row in &inst.train {
        let batch = batch_of(&inst, std::slice::from_ref(row));
        let raw = clipped_sum(model, &inst.adapter, &batch, 1e9, PerExampleMethod::Expanded, false);
        let norm = |s: &[Tensor]| s.iter().map(|t| t.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
        let g = raw.norms[0];
        assert!((norm(&raw.sum) - g).abs() < 1e-5 * g.max(1.0));
        let small = clipped_sum(model, &inst.adapter, &batch, g / 4.0, PerExampleMethod::Expanded, false);
        let n = norm(&small.sum);
        assert!(n <= g / 4.0 * (1.0 + 1e-6) && n > g / 4.0 * (1.0 - 1e-4), "clipped norm {n}, C = {}", g / 4.0);
    }
}

/// The noise of a step: each coordinate N(0, (σC)²) before the division by qN; its
/// sample mean and std over 60,000 coordinates are within 4 standard errors.
#[test]
fn noise_has_the_calibrated_standard_deviation() {
    let dp = DpSgdConfig { noise_multiplier: 1.3, max_grad_norm: 0.7, sample_rate: 0.02 };
    let zeros = vec![Tensor::zeros([200, 100], (Kind::Float, Device::Cpu)), Tensor::zeros([20000], (Kind::Float, Device::Cpu))];
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let out = noised_mean(&zeros, &dp, 500, &mut rng);
    let all = Tensor::cat(&[out[0].flatten(0, -1), out[1].shallow_clone()], 0).to_kind(Kind::Double);
    let n = all.numel() as f64;
    let expected = 1.3 * 0.7 / (0.02 * 500.0);
    let (mean, std) = (all.mean(Kind::Double).double_value(&[]), all.std(true).double_value(&[]));
    assert!(mean.abs() < 4.0 * expected / n.sqrt(), "mean {mean}");
    assert!((std / expected - 1.0).abs() < 4.0 / (2.0 * n).sqrt(), "std {std}, expected {expected}");
    // A non-zero sum is shifted, not replaced.
    let ones = vec![Tensor::ones([4], (Kind::Float, Device::Cpu))];
    let none = DpSgdConfig { noise_multiplier: 0.0, ..dp };
    let exact = noised_mean(&ones, &none, 500, &mut rng);
    assert!((exact[0].double_value(&[0]) - 0.1).abs() < 1e-7);
}

/// Poisson sampling: the batch size is Binomial(N, q) (chi-square over its histogram,
/// 2,000 batches) and every record is drawn at rate q.
#[test]
fn poisson_batches_have_binomial_sizes() {
    let (n, q, trials) = (200usize, 0.05f64, 2000usize);
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let mut hist = vec![0usize; n + 1];
    let mut per_record = vec![0usize; n];
    for _ in 0..trials {
        let b = poisson_sample(n, q, &mut rng);
        assert!(b.windows(2).all(|w| w[0] < w[1]), "indices distinct and sorted");
        hist[b.len()] += 1;
        for i in b {
            per_record[i] += 1;
        }
    }
    // Binomial pmf, with bins of expected count < 5 merged into the tails.
    let ln_choose = |k: usize| -> f64 { (1..=k).map(|i| (((n - k + i) as f64) / i as f64).ln()).sum() };
    let pmf: Vec<f64> = (0..=n).map(|k| (ln_choose(k) + k as f64 * q.ln() + (n - k) as f64 * (1.0 - q).ln()).exp()).collect();
    let mut bins: Vec<(f64, f64)> = Vec::new();
    let (mut obs, mut exp) = (0.0, 0.0);
    for k in 0..=n {
        obs += hist[k] as f64;
        exp += pmf[k] * trials as f64;
        if exp >= 5.0 {
            bins.push((obs, exp));
            (obs, exp) = (0.0, 0.0);
        }
    }
    if let Some(last) = bins.last_mut() {
        last.0 += obs;
        last.1 += exp;
    }
    let chi2: f64 = bins.iter().map(|(o, e)| (o - e).powi(2) / e).sum();
    let bins = bins.len();
    // 99.9th percentile of chi-square with `bins - 1` degrees of freedom (Wilson-Hilferty).
    let dof = (bins - 1) as f64;
    let limit = dof * (1.0 - 2.0 / (9.0 * dof) + 3.09 * (2.0 / (9.0 * dof)).sqrt()).powi(3);
    assert!(chi2 < limit, "chi-square {chi2:.1} over {bins} bins, limit {limit:.1}");
    let rate = per_record.iter().sum::<usize>() as f64 / (n * trials) as f64;
    assert!((rate - q).abs() < 4.0 * (q * (1.0 - q) / (n * trials) as f64).sqrt());
    assert!(per_record.iter().all(|&c| c > 0));
}

/// DP-SGD training (σ = 0.6, q = 1/4, C = 1) lowers the loss on the records, clipping some.
#[test]
fn dp_sgd_training_lowers_the_loss() {
    let inst = institution("minilm", LoraMode::Ffa, 48, 48);
    let before = evaluate(&inst.model, &inst.encoder, &inst.train, 16, Device::Cpu);
    let dp = DpSgdConfig { noise_multiplier: 0.6, max_grad_norm: 1.0, sample_rate: 0.25 };
    let cfg = TrainConfig { steps: 14, batch_size: 8, lr: 3e-3, log_every: 0, dp_sgd: Some(dp), ..Default::default() };
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let stats = train_dp(&inst.model, &inst.adapter, &inst.encoder, &inst.train, &cfg, &dp, &mut rng, "t").unwrap();
    let after = evaluate(&inst.model, &inst.encoder, &inst.train, 16, Device::Cpu);
    assert!(after.loss < before.loss, "loss {} -> {}", before.loss, after.loss);
    assert_eq!(stats.steps, 14);
    assert!(stats.examples > 0 && stats.clipped_fraction > 0.0 && stats.clipped_fraction <= 1.0);
}

/// Steps whose Poisson batch is empty still take a noised step (skipping them would be a
/// different mechanism from the one accounted); with no noise and no records nothing moves.
#[test]
fn empty_batches_are_noise_only_steps() {
    let inst = institution("minilm", LoraMode::Ffa, 8, 32);
    let start = inst.adapter.flatten_update().unwrap();
    let dp = DpSgdConfig { noise_multiplier: 1.0, max_grad_norm: 1.0, sample_rate: 1e-9 };
    let cfg = TrainConfig { steps: 3, batch_size: 4, lr: 1e-2, warmup: 0.0, log_every: 0, dp_sgd: Some(dp), ..Default::default() };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let stats = train_dp(&inst.model, &inst.adapter, &inst.encoder, &inst.train, &cfg, &dp, &mut rng, "t").unwrap();
    assert_eq!((stats.steps, stats.examples), (3, 0));
    assert!(stats.final_loss.is_nan());
    let moved = inst.adapter.flatten_update().unwrap();
    assert!(moved.iter().zip(&start).any(|(a, b)| a != b), "a noise-only step moves the adapter");

    let before = inst.adapter.flatten_update().unwrap();
    let quiet = DpSgdConfig { noise_multiplier: 0.0, ..dp };
    train_dp(&inst.model, &inst.adapter, &inst.encoder, &inst.train, &TrainConfig { dp_sgd: Some(quiet), ..cfg.clone() }, &quiet, &mut rng, "t").unwrap();
    assert_eq!(inst.adapter.flatten_update().unwrap(), before);
}

/// Bad DP-SGD settings are refused with what to change, before any step.
#[test]
fn bad_dp_settings_are_refused() {
    let inst = institution("minilm", LoraMode::Ffa, 4, 32);
    let good = DpSgdConfig { noise_multiplier: 1.0, max_grad_norm: 1.0, sample_rate: 0.5 };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let run = |dp: DpSgdConfig, accum: usize, rng: &mut ChaCha20Rng| {
        let cfg = TrainConfig { steps: 1, grad_accum: accum, log_every: 0, dp_sgd: Some(dp), ..Default::default() };
        train_dp(&inst.model, &inst.adapter, &inst.encoder, &inst.train, &cfg, &dp, rng, "t").map(|_| ()).map_err(|e| e.to_string())
    };
    assert!(run(good, 2, &mut rng).unwrap_err().contains("gradient accumulation"));
    assert!(run(DpSgdConfig { sample_rate: 0.0, ..good }, 1, &mut rng).unwrap_err().contains("sampling rate"));
    assert!(run(DpSgdConfig { sample_rate: 1.5, ..good }, 1, &mut rng).unwrap_err().contains("sampling rate"));
    assert!(run(DpSgdConfig { max_grad_norm: 0.0, ..good }, 1, &mut rng).unwrap_err().contains("clipping norm"));
    assert!(run(DpSgdConfig { noise_multiplier: f64::NAN, ..good }, 1, &mut rng).unwrap_err().contains("noise multiplier"));
    run(good, 1, &mut rng).unwrap();
}

/// The plan of a federation run: σ calibrated so that all rounds exactly fit the budget
/// given what the ledger holds; each run charged before it starts; the run past the
/// budget refused with its numbers; a plan that cannot finish refused up front.
#[test]
fn record_privacy_plans_and_charges_every_run() {
    use tessera_client::ledger::PrivacyLedger;
    use tessera_client::train::dpsgd::{RecordPrivacy, RecordPrivacyRequest};
    use tessera_secagg::prv::Accountant;
    let mut sigmas = Vec::new();
    for accountant in [Accountant::Rdp, Accountant::Prv] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("privacy-ledger.json");
        let req = RecordPrivacyRequest { budget: 4.0, delta: 1e-5, noise_multiplier: None, max_grad_norm: 1.0, sample_rate: None, accountant };
        let plan = RecordPrivacy::plan(&req, &PrivacyLedger::load(&path).unwrap(), 2000, 16, 50, 3).unwrap();
        assert!((plan.dp.sample_rate - 0.008).abs() < 1e-12, "q = batch / N");
        sigmas.push(plan.dp.noise_multiplier);
        let mut last = 0.0;
        for r in 1..=3 {
            let eps = plan.charge(&path, &format!("round {r}"), r).unwrap();
            assert!(eps > last && eps <= 4.0, "{accountant} round {r}: ε {eps}");
            last = eps;
        }
        assert!(last > 4.0 * 0.99, "{accountant}: calibrated to use the budget: {last}");
        let err = plan.charge(&path, "round 4", 4).unwrap_err().to_string();
        assert!(err.contains("round 4") && err.contains("record-level budget"), "{err}");
        // The next run's plan sees what is spent: nothing is left for it.
        let ledger = PrivacyLedger::load(&path).unwrap();
        assert_eq!(ledger.record_level.len(), 3);
        let again = RecordPrivacy::plan(&RecordPrivacyRequest { noise_multiplier: Some(1.0), ..req.clone() }, &ledger, 2000, 16, 50, 1);
        assert!(again.unwrap_err().to_string().contains("spent already"));
        // The claim signed with the last run passes the aggregator's check.
        plan.claim(last).validate().unwrap();
        let fresh = PrivacyLedger::load(&dir.path().join("none.json")).unwrap();
        assert!(RecordPrivacy::plan(&RecordPrivacyRequest { delta: 1e-3, ..req.clone() }, &fresh, 2000, 16, 50, 3)
            .unwrap_err()
            .to_string()
            .contains("1/records"));
        assert!(RecordPrivacy::plan(&RecordPrivacyRequest { noise_multiplier: Some(0.0), ..req.clone() }, &fresh, 2000, 16, 50, 3).is_err());
    }
    // The PRV's tighter ε buys the same budget with less noise.
    assert!(sigmas[1] < sigmas[0], "σ by PRV {} vs RDP {}", sigmas[1], sigmas[0]);
}

/// DP-SGD on the instruction objective, on the tiny transformers Llama (both LoRA
/// factors trained, B moved off zero): records of different prompt and response lengths
/// in one padded batch; the expanded-weights path gives the one-at-a-time reference's
/// per-record norms and clipped sum within 1e-5, a clipped record contributes at most C,
/// and a few DP-SGD steps of federated-style training run with finite losses.
#[test]
fn per_example_gradients_match_the_reference_sft() {
    use tessera_client::train::dpsgd::clipped_sum_sft;
    use tessera_client::train::llama::Llama;
    use tessera_client::train::sft::{sft_batch, SftEncoded, IGNORE};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama-features/base");
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()], mode: LoraMode::Both, seed: 7 };
    let mut adapter = tessera_client::train::Adapter::new(lora, "CAUSAL_LM", Device::Cpu, Kind::Float).unwrap();
    let llama = Llama::load(&dir, &mut adapter, Device::Cpu).unwrap();
    let moved: Vec<f32> = (0..adapter.flatten_update().unwrap().len()).map(|i| ((i % 13) as f32 - 6.0) * 2e-2).collect();
    adapter.add_flat(&moved).unwrap();
    let records: Vec<SftEncoded> = [(3usize, 9usize), (6, 14), (2, 5), (8, 20), (4, 11)]
        .iter()
        .enumerate()
        .map(|(k, &(prompt, len))| {
            let ids: Vec<i64> = (0..len).map(|i| 3 + ((i * 7 + k * 11) % 45) as i64).collect();
            let labels = ids.iter().enumerate().map(|(i, &t)| if i < prompt { IGNORE } else { t }).collect();
            SftEncoded { ids, labels }
        })
        .collect();
    let items: Vec<&SftEncoded> = records.iter().collect();
    let batch = sft_batch(&items, 0, Device::Cpu);
    let probe = clipped_sum_sft(&llama, &adapter, &batch, 1e9, PerExampleMethod::OneByOne, false);
    let c = median(&probe.norms);
    let reference = clipped_sum_sft(&llama, &adapter, &batch, c, PerExampleMethod::OneByOne, false);
    let fast = clipped_sum_sft(&llama, &adapter, &batch, c, PerExampleMethod::Expanded, false);
    for (f, r) in fast.norms.iter().zip(&reference.norms) {
        assert!((f - r).abs() <= 1e-5 * r.max(1.0), "per-record norm {f} vs reference {r}");
    }
    let (diff, scale) = max_abs_diff(&fast.sum, &reference.sum);
    assert!(diff <= 1e-5 * scale.max(1.0), "clipped sum differs by {diff} (largest entry {scale})");
    let clipped = fast.norms.iter().filter(|&&n| n > c).count();
    assert!(clipped >= 1 && clipped < records.len());
    // One record alone, C below its norm: its contribution has norm C.
    let one = sft_batch(&[&records[3]], 0, Device::Cpu);
    let alone = clipped_sum_sft(&llama, &adapter, &one, 1e9, PerExampleMethod::OneByOne, false).norms[0];
    let capped = clipped_sum_sft(&llama, &adapter, &one, alone / 2.0, PerExampleMethod::Expanded, false);
    let norm = capped.sum.iter().map(|t| t.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
    assert!((norm - alone / 2.0).abs() < 1e-4 * alone, "{norm} vs C = {}", alone / 2.0);
    eprintln!("SFT per-example gradients: fast vs reference max diff {diff:e} (largest entry {scale:.3e}), C = {c:.4}");
}
