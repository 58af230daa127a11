//! The communication graph of SecAgg+: a Harary graph H(k, n) over a random permutation
//! of the participants (Bell et al. 2020, Sec. 3). Each client exchanges pairwise masks
//! and secret shares only with its `k` neighbours, so a client's work is O(k + m) rather
//! than O(n + m). The permutation is drawn from the public `graph_seed`, so every party
//! derives the same graph and the server cannot choose it.

use rand::seq::SliceRandom;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::config::{ClientId, RoundConfig};
use crate::error::Error;

#[derive(Clone, Debug)]
pub struct CommunicationGraph {
    neighbours: Vec<Vec<ClientId>>,
}

impl CommunicationGraph {
    pub fn for_config(cfg: &RoundConfig) -> Result<Self, Error> {
        Ok(Self::new(cfg.participants(), cfg.neighbours as usize, cfg.graph_seed_bytes()?))
    }

    pub fn new(n: usize, k: usize, seed: [u8; 32]) -> Self {
        let mut neighbours = vec![Vec::with_capacity(k); n];
        if k + 1 >= n {
            for (i, list) in neighbours.iter_mut().enumerate() {
                list.extend((0..n).filter(|&j| j != i).map(|j| ClientId(j as u32)));
            }
            return CommunicationGraph { neighbours };
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha20Rng::from_seed(seed));
        for (pos, &node) in order.iter().enumerate() {
            for d in 1..=k / 2 {
                neighbours[node].push(ClientId(order[(pos + d) % n] as u32));
                neighbours[node].push(ClientId(order[(pos + n - d) % n] as u32));
            }
        }
        for list in &mut neighbours {
            list.sort_unstable();
            list.dedup();
        }
        CommunicationGraph { neighbours }
    }

    /// Sorted neighbours of `id`; a share dealt by `id` to `neighbours(id)[j]` has
    /// x-coordinate `j + 1`.
    pub fn neighbours(&self, id: ClientId) -> &[ClientId] {
        self.neighbours.get(id.0 as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn are_neighbours(&self, a: ClientId, b: ClientId) -> bool {
        self.neighbours(a).binary_search(&b).is_ok()
    }

    /// The x-coordinate of the share that `dealer` gave to `holder`, if they are neighbours.
    pub fn share_index(&self, dealer: ClientId, holder: ClientId) -> Option<u8> {
        self.neighbours(dealer).binary_search(&holder).ok().map(|j| (j + 1) as u8)
    }

    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_is_k_regular_and_symmetric() {
        for (n, k) in [(10, 4), (11, 6), (50, 8), (7, 6), (3, 2)] {
            let g = CommunicationGraph::new(n, k, [3; 32]);
            for i in 0..n {
                let id = ClientId(i as u32);
                assert_eq!(g.neighbours(id).len(), k.min(n - 1), "n={n} k={k}");
                assert!(!g.are_neighbours(id, id));
                for &j in g.neighbours(id) {
                    assert!(g.are_neighbours(j, id), "edge {i}-{} not symmetric", j.0);
                }
            }
        }
    }

    #[test]
    fn graph_depends_on_seed() {
        let a = CommunicationGraph::new(40, 4, [1; 32]);
        let b = CommunicationGraph::new(40, 4, [2; 32]);
        assert!((0..40).any(|i| a.neighbours(ClientId(i)) != b.neighbours(ClientId(i))));
    }
}
