//! A parameter server: one actor holds the model's weights; N worker tasks
//! each fetch the weights, compute a gradient on their own shard of a
//! synthetic linear-regression data set, and push it back. The mean squared
//! error falls as the workers train.
//!
//! Run: `cargo run -p shoal-examples --bin parameter_server -- [workers] [rounds]`

use shoal::prelude::*;

const DIM: usize = 8;
const SHARD: usize = 256;

/// The true weights the data is made from.
fn true_weights() -> Vec<f64> {
    (0..DIM).map(|i| (i as f64 - 3.5) / 2.0).collect()
}

/// Shard `seed`: inputs and targets, deterministic.
fn shard(seed: u64) -> (Vec<[f64; DIM]>, Vec<f64>) {
    let w = true_weights();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 2000) as f64 / 1000.0 - 1.0
    };
    let mut xs = Vec::with_capacity(SHARD);
    let mut ys = Vec::with_capacity(SHARD);
    for _ in 0..SHARD {
        let mut x = [0.0; DIM];
        x.iter_mut().for_each(|v| *v = next());
        let y = x.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + 0.01 * next();
        xs.push(x);
        ys.push(y);
    }
    (xs, ys)
}

fn mse(w: &[f64], xs: &[[f64; DIM]], ys: &[f64]) -> f64 {
    xs.iter()
        .zip(ys)
        .map(|(x, y)| (x.iter().zip(w).map(|(a, b)| a * b).sum::<f64>() - y).powi(2))
        .sum::<f64>()
        / xs.len() as f64
}

#[shoal::actor]
pub struct ParameterServer {
    weights: Vec<f64>,
    learning_rate: f64,
    updates: u64,
}

#[shoal::actor]
impl ParameterServer {
    pub fn new(learning_rate: f64) -> Self {
        ParameterServer {
            weights: vec![0.0; DIM],
            learning_rate,
            updates: 0,
        }
    }

    pub fn weights(&self) -> Vec<f64> {
        self.weights.clone()
    }

    pub fn apply(&mut self, gradient: Vec<f64>) -> u64 {
        for (w, g) in self.weights.iter_mut().zip(gradient) {
            *w -= self.learning_rate * g;
        }
        self.updates += 1;
        self.updates
    }
}

/// Trains for `rounds` rounds on shard `seed`, talking to the server directly.
#[shoal::remote]
fn train(ps: ActorHandle<ParameterServer>, seed: u64, rounds: u32) -> u32 {
    let (xs, ys) = shard(seed);
    for _ in 0..rounds {
        let w = ps.weights().get().expect("weights");
        let mut gradient = vec![0.0; DIM];
        for (x, y) in xs.iter().zip(&ys) {
            let error = x.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() - y;
            gradient
                .iter_mut()
                .zip(x)
                .for_each(|(g, xi)| *g += 2.0 * error * xi / xs.len() as f64);
        }
        ps.apply(gradient).get().expect("apply");
    }
    rounds
}

fn main() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let mut args = std::env::args().skip(1);
    let workers: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let rounds: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let ps = ParameterServer::remote(0.1)?;
    let (xs, ys) = shard(999);
    let before = mse(&ps.weights().get()?, &xs, &ys);
    let done: Vec<_> = (0..workers)
        .map(|seed| train::remote(ps.clone(), seed, rounds))
        .collect();
    shoal::get_all(&done)?;
    let after = mse(&ps.weights().get()?, &xs, &ys);
    println!("{workers} workers x {rounds} rounds: held-out MSE {before:.4} -> {after:.6}");
    assert!(
        after < 0.01 && after < before / 100.0,
        "training must reduce the loss"
    );
    println!("loss below 0.01");
    Ok(())
}
