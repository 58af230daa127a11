//! Server optimizers for federated learning (Reddi et al., "Adaptive Federated
//! Optimization", ICLR 2021): the released mean update Δ is treated as a pseudo-gradient.
//!
//! - FedAvg: x ← x + η·Δ (η = 1 is plain FedAvg).
//! - FedAdam: m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²; x ← x + η·m/(√v + τ).
//! - FedYogi: as FedAdam, but v ← v − (1−β₂)·Δ²·sign(v − Δ²).
//!
//! The aggregator never holds the model: every institution applies the same optimizer to
//! the same signed release, in the same f32 arithmetic, so all of them hold bit-identical
//! global adapters, and the optimizer state never leaves them either.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    FedAvg,
    FedAdam,
    FedYogi,
}

#[derive(Clone, Debug)]
pub struct ServerOptimizer {
    pub strategy: Strategy,
    /// Server learning rate η.
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// Adaptivity τ (also the initial √v, as in the paper: v₋₁ = τ²).
    pub tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl ServerOptimizer {
    /// The paper's defaults: β₁ = 0.9, β₂ = 0.99, τ = 1e-3.
    pub fn new(strategy: Strategy, lr: f32) -> ServerOptimizer {
        ServerOptimizer { strategy, lr, beta1: 0.9, beta2: 0.99, tau: 1e-3, m: Vec::new(), v: Vec::new() }
    }

    /// The step to add to the global parameters for the released mean update `delta`.
    pub fn step(&mut self, delta: &[f32]) -> Vec<f32> {
        if self.strategy == Strategy::FedAvg {
            return delta.iter().map(|d| self.lr * d).collect();
        }
        if self.m.len() != delta.len() {
            self.m = vec![0.0; delta.len()];
            self.v = vec![self.tau * self.tau; delta.len()];
        }
        let (b1, b2) = (self.beta1, self.beta2);
        let mut out = Vec::with_capacity(delta.len());
        for ((m, v), &d) in self.m.iter_mut().zip(self.v.iter_mut()).zip(delta) {
            *m = b1 * *m + (1.0 - b1) * d;
            let d2 = d * d;
            *v = match self.strategy {
                Strategy::FedYogi => *v - (1.0 - b2) * d2 * (*v - d2).signum(),
                _ => b2 * *v + (1.0 - b2) * d2,
            };
            out.push(self.lr * *m / (v.sqrt() + self.tau));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_is_the_mean_scaled_by_the_server_rate() {
        assert_eq!(ServerOptimizer::new(Strategy::FedAvg, 1.0).step(&[0.5, -2.0]), vec![0.5, -2.0]);
        assert_eq!(ServerOptimizer::new(Strategy::FedAvg, 0.5).step(&[0.5, -2.0]), vec![0.25, -1.0]);
    }

    /// Two steps of FedAdam and FedYogi by hand (β₁ = 0.9, β₂ = 0.99, τ = 1e-3, η = 0.1).
    #[test]
    fn adam_and_yogi_follow_the_paper() {
        let (b1, b2, tau, lr) = (0.9f64, 0.99f64, 1e-3f64, 0.1f64);
        let deltas = [[0.2f64, -0.05], [0.1, 0.3]];
        for strategy in [Strategy::FedAdam, Strategy::FedYogi] {
            let mut opt = ServerOptimizer::new(strategy, lr as f32);
            let (mut m, mut v) = ([0.0f64; 2], [tau * tau; 2]);
            for d in deltas {
                let got = opt.step(&d.map(|x| x as f32));
                for j in 0..2 {
                    m[j] = b1 * m[j] + (1.0 - b1) * d[j];
                    let d2 = d[j] * d[j];
                    v[j] = if strategy == Strategy::FedYogi { v[j] - (1.0 - b2) * d2 * (v[j] - d2).signum() } else { b2 * v[j] + (1.0 - b2) * d2 };
                    let want = lr * m[j] / (v[j].sqrt() + tau);
                    assert!((f64::from(got[j]) - want).abs() < 1e-5 * want.abs().max(1.0), "{strategy:?} coord {j}: {} vs {want}", got[j]);
                }
            }
        }
    }
}
