//! Error feedback for rounds that send a shared random-k subset of the coordinates
//! ([`tessera_secagg::compress`]): what a round does not send is kept here, in the
//! institution's memory, and added to its next update, so every coordinate of every
//! update reaches the federation eventually (Stich et al., NeurIPS 2018; Karimireddy et
//! al., ICML 2019). The residual is the institution's own data and never leaves it.

use tessera_secagg::compress::Encoding;
use tessera_secagg::RoundConfig;

/// The coordinates an institution has not sent yet.
#[derive(Clone, Debug, Default)]
pub struct ErrorFeedback {
    residual: Option<Vec<f32>>,
}

/// What [`ErrorFeedback::apply`] did for one round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sent {
    /// Coordinates the round sends.
    pub kept: usize,
    /// Coordinates of the update.
    pub of: usize,
    /// L2 norm of what is kept back for later rounds.
    pub residual_norm: f64,
}

impl ErrorFeedback {
    /// For a round with shared random-k: adds the residual of earlier rounds to `delta`,
    /// keeps the coordinates this round does not send as the new residual, and zeroes
    /// them in `delta` (so a DP clip that follows spends its bound on what is sent).
    /// Other rounds leave `delta` and the residual alone and return `None`.
    pub fn apply(&mut self, delta: &mut [f32], cfg: &RoundConfig) -> Result<Option<Sent>, tessera_secagg::Error> {
        let Some(encoding) = Encoding::for_config(cfg)? else { return Ok(None) };
        let Some(kept) = encoding.selected().map(<[u32]>::len) else { return Ok(None) };
        if let Some(r) = self.residual.take() {
            // A layout change between rounds makes an old residual meaningless: it is dropped.
            if r.len() == delta.len() {
                delta.iter_mut().zip(&r).for_each(|(d, r)| *d += r);
            }
        }
        let residual = encoding.residual(delta);
        delta.iter_mut().zip(&residual).for_each(|(d, r)| *d -= r);
        let residual_norm = residual.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        self.residual = Some(residual);
        Ok(Some(Sent { kept, of: delta.len(), residual_norm }))
    }

    pub fn residual(&self) -> Option<&[f32]> {
        self.residual.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_secagg::compress::Compression;

    fn cfg(round: u64, keep: u32) -> RoundConfig {
        let mut cfg = RoundConfig::with_defaults(round, (0..3).map(|i| hex::encode([i as u8; 32])).collect(), 100, [5; 32]);
        cfg.compression = Some(Compression { keep: Some(keep), rotation_block: None });
        cfg
    }

    #[test]
    fn nothing_is_lost_across_rounds() {
        let mut fb = ErrorFeedback::default();
        let update: Vec<f32> = (0..100).map(|i| i as f32 * 0.01).collect();
        let mut total_sent = vec![0f32; 100];
        let rounds = 40;
        for r in 0..rounds {
            let mut d = if r == 0 { update.clone() } else { vec![0.0; 100] };
            let sent = fb.apply(&mut d, &cfg(r, 20)).unwrap().unwrap();
            assert_eq!((sent.kept, sent.of), (20, 100));
            assert!(d.iter().filter(|&&x| x != 0.0).count() <= 20);
            total_sent.iter_mut().zip(&d).for_each(|(t, x)| *t += x);
        }
        // What was sent plus what is still held is the update, coordinate by coordinate.
        let held = fb.residual().unwrap();
        for i in 0..100 {
            assert!((total_sent[i] + held[i] - update[i]).abs() < 1e-6, "{i}");
        }
        // After 40 rounds of 20% each, almost nothing is still held (0.8^40 ≈ 1.3e-4 per coordinate).
        let left: f64 = held.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        let all: f64 = update.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        assert!(left < 0.05 * all, "{left} of {all}");
    }

    #[test]
    fn rounds_without_random_k_leave_the_update_alone() {
        let mut fb = ErrorFeedback::default();
        let mut plain = RoundConfig::with_defaults(1, (0..3).map(|i| hex::encode([i as u8; 32])).collect(), 4, [5; 32]);
        let mut d = vec![1.0, 2.0, 3.0, 4.0];
        assert_eq!(fb.apply(&mut d, &plain).unwrap(), None);
        plain.compression = Some(Compression { keep: None, rotation_block: Some(4) });
        assert_eq!(fb.apply(&mut d, &plain).unwrap(), None);
        assert_eq!(d, vec![1.0, 2.0, 3.0, 4.0]);
        assert!(fb.residual().is_none());
    }
}
