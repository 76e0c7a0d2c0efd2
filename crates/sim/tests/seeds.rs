//! The simulation in `make test`: a few dozen seeds keep every invariant,
//! and a seed replays to the same trace. `make sim SEEDS=N` runs more.

/// Seeds run here (`SHOAL_SIM_SEEDS` overrides).
fn seeds() -> u64 {
    std::env::var("SHOAL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

#[test]
fn every_seed_keeps_the_invariants() {
    let failed: Vec<String> = (0..seeds())
        .map(shoal_sim::run)
        .filter(|r| r.violation.is_some())
        .map(|r| r.to_string())
        .collect();
    assert!(failed.is_empty(), "seeds broke invariants: {failed:#?}");
}

#[test]
fn a_seed_replays_to_the_same_trace_and_seeds_differ() {
    for seed in [3, 17, 1234] {
        let (a, b) = (shoal_sim::run(seed), shoal_sim::run(seed));
        assert_eq!(
            (a.hash, a.events),
            (b.hash, b.events),
            "seed {seed} ran differently twice"
        );
        assert!(a.events > 500, "seed {seed} did some work: {a}");
    }
    assert_ne!(shoal_sim::run(1).hash, shoal_sim::run(2).hash);
}

#[test]
fn the_simulation_injects_the_faults_it_claims() {
    // Over a handful of seeds: crashes and cuts happen, and some runs lose
    // requests (a run with none of these would test nothing).
    let reports: Vec<_> = (0..10).map(shoal_sim::run).collect();
    let faults: usize = reports.iter().map(|r| r.faults).sum();
    assert!(faults >= 10, "crashes, cuts and heals injected: {faults}");
    let drops = (0..10)
        .filter(|s| shoal_sim::Config::for_seed(*s).drop_rate > 0.0)
        .count();
    assert!(drops >= 3, "seeds with lost requests: {drops}");
}
