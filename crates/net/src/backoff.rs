//! Capped exponential backoff with jitter, for the processes that dial a
//! head again after losing it (node daemons, drivers and workers alike).

use std::time::Duration;

/// Pauses between tries: each the last one doubled (up to a cap), plus up
/// to half of it at random, so the processes of a cluster do not all knock
/// at a restarted head at once.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Pauses from `first`, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }

    /// Back to the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The pause before the next try.
    pub fn next_pause(&mut self) -> Duration {
        let jitter = shoal_proto::ids::Uuid::new_v4().as_u64_pair().0 % 1000;
        let pause = self.next + self.next.mul_f64(jitter as f64 / 2000.0);
        self.next = (self.next * 2).min(self.max);
        pause
    }
}

/// Runs `attempt` again, after a growing pause, while its error is a busy
/// answer (`busy`) and `patience` has not run out; returns the first other
/// outcome, or the last busy error.
pub async fn while_busy<T, E, Fut>(
    patience: Duration,
    busy: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let give_up = std::time::Instant::now() + patience;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match attempt().await {
            Err(e) if busy(&e) && std::time::Instant::now() < give_up => {
                tracing::debug!("busy; trying again");
                tokio::time::sleep(backoff.next_pause()).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_with_at_most_half_more() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(50), ms(300));
        for base in [50, 100, 200, 300, 300] {
            let pause = b.next_pause();
            assert!(
                pause >= ms(base) && pause <= ms(base) * 3 / 2,
                "{pause:?} for {base}"
            );
        }
        b.reset();
        assert!(b.next_pause() <= ms(75));
    }
}
