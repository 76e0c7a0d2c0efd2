//! Scenarios of Ray's core API that Shoal matches: worker environments,
//! cancellation and timeouts, and more as they come. Each prints one `RESULT {json}` line.

use serde_json::json;
use shoal::prelude::*;

use super::result;

#[path = "cancel.rs"]
mod cancel;

/// The values of `names` in this worker's environment, and its pid.
#[shoal::remote]
fn read_env(names: Vec<String>) -> (Vec<Option<String>>, u32) {
    let values = names.iter().map(|n| std::env::var(n).ok()).collect();
    (values, std::process::id())
}

/// `read_env` of `K` run as a task of this task (which inherits its
/// environment).
#[shoal::remote]
fn read_env_nested() -> Option<String> {
    let (values, _) = read_env::remote(vec!["K".to_string()])
        .get()
        .expect("the nested task runs");
    values.into_iter().next().flatten()
}

/// An actor that reports its worker's environment.
#[shoal::actor]
pub struct EnvReader;

#[shoal::actor]
impl EnvReader {
    pub fn new() -> Self {
        EnvReader
    }

    pub fn read(&self, name: String) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Runs the scenario `name` if it is one of these (each initialises Shoal
/// itself); `None` otherwise.
pub fn run(name: &str) -> Option<shoal::Result<()>> {
    match name {
        "env" => Some(env()),
        "cancel" => Some(cancel::run()),
        _ => None,
    }
}

/// Worker environments: a job default, task and actor variables over it,
/// inheritance by nested tasks, no worker shared between environments, and
/// bad names refused.
fn env() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env().env_var("JOB_LEVEL", "job"))?;
    let names = || vec!["K".to_string(), "JOB_LEVEL".to_string()];
    let with_k = |v: &str| read_env::options().env_var("K", v);
    // Interleaved, so that a shared worker would show up.
    let mut refs = Vec::new();
    for _ in 0..6 {
        refs.push(("V1", with_k("V1").remote(names())));
        refs.push(("V2", with_k("V2").remote(names())));
        refs.push(("none", read_env::remote(names())));
    }
    let mut seen = serde_json::Map::new();
    let mut pids: std::collections::BTreeMap<&str, std::collections::BTreeSet<u32>> =
        Default::default();
    for (tag, r) in refs {
        let (values, pid) = r.get()?;
        seen.insert(tag.to_string(), json!(values));
        pids.entry(tag).or_default().insert(pid);
    }
    let shared = pids["V1"].intersection(&pids["V2"]).count()
        + pids["V1"].intersection(&pids["none"]).count()
        + pids["V2"].intersection(&pids["none"]).count();
    let (overridden, _) = read_env::options()
        .env_var("JOB_LEVEL", "task")
        .remote(names())
        .get()?;
    let nested = read_env_nested::options()
        .env_var("K", "V3")
        .remote()
        .get()?;
    let actor = EnvReader::options().env_var("K", "actor").remote()?;
    let in_actor = actor.read("K".to_string()).get()?;
    let actor_job = actor.read("JOB_LEVEL".to_string()).get()?;
    let refused = |name: &str| match read_env::options().env_var(name, "1").remote(names()).get() {
        Err(Error::InvalidOptions(m)) => json!(m),
        other => json!(format!("not refused: {other:?}")),
    };
    let actor_refused = matches!(
        EnvReader::options().env_var("SHOAL_TOKEN", "x").remote(),
        Err(Error::InvalidOptions(_))
    );
    result(json!({
        "seen": seen,
        "shared_workers": shared,
        "driver_pid": std::process::id(),
        "pids_v1": pids["V1"],
        "pids_v2": pids["V2"],
        "overridden": overridden,
        "nested": nested,
        "actor": in_actor,
        "actor_job": actor_job,
        "refused_shoal": refused("SHOAL_X"),
        "refused_digit": refused("1BAD"),
        "actor_refused": actor_refused,
    }));
    Ok(())
}
