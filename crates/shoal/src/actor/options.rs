//! The options of an actor's creation.

use shoal_proto::ResourceSet;

use super::DEFAULT_NAMESPACE;
use crate::error::{Error, Result};

/// Options of an actor's creation.
#[derive(Clone, Debug)]
pub struct ActorOptions {
    pub(crate) resources: ResourceSet,
    pub(crate) max_concurrency: Option<u32>,
    pub(crate) max_pending_calls: Option<u32>,
    pub(crate) name: Option<String>,
    pub(crate) namespace: String,
    pub(crate) detached: bool,
    pub(crate) max_restarts: u32,
    pub(crate) max_task_retries: u32,
    pub(crate) scheduling: crate::scheduling::Scheduling,
    pub(crate) env: shoal_proto::EnvVars,
}

impl Default for ActorOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl ActorOptions {
    /// No CPUs held while the actor lives (as Ray's default), one call at a
    /// time for sync methods, 1000 for async ones.
    pub fn new() -> Self {
        Self {
            resources: ResourceSet::new(),
            max_concurrency: None,
            max_pending_calls: None,
            name: None,
            namespace: DEFAULT_NAMESPACE.to_string(),
            detached: false,
            max_restarts: 0,
            max_task_retries: 0,
            scheduling: Default::default(),
            env: Default::default(),
        }
    }

    /// CPUs the actor holds for its life.
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.resources.set(shoal_proto::resources::CPU, n);
        self
    }

    /// A custom resource the actor holds for its life.
    pub fn resource(mut self, name: &str, quantity: f64) -> Self {
        self.resources.set(name, quantity);
        self
    }

    crate::scheduling::placement_options!("held for its life");

    /// Sets `name` to `value` in the environment of the actor's worker
    /// process, over the job's default (`Config::env_var`), also when it
    /// restarts. An actor always has a worker of its own.
    pub fn env_var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.set(name, value);
        self
    }

    /// Calls that may run at once (`&self` methods on threads, `async`
    /// methods on the runtime); `&mut self` methods always run alone.
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = Some(n.max(1));
        self
    }

    /// A name, unique in the namespace, by which any driver can find the
    /// actor with `shoal::get_actor`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The namespace of the name (default `"default"`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The actor outlives its creator's job, until `shoal::kill`.
    pub fn lifetime_detached(mut self) -> Self {
        self.detached = true;
        self
    }

    /// Calls a handle may have unanswered; more fail at once with
    /// [`Error::PendingCallsExceeded`].
    pub fn max_pending_calls(mut self, n: u32) -> Self {
        self.max_pending_calls = Some(n);
        self
    }

    /// Times the actor is restarted (its constructor run again in a new
    /// worker, a new incarnation) when its worker or node dies. Default 0:
    /// the actor dies with its worker.
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.max_restarts = n;
        self
    }

    /// Times a call in flight when the actor's worker died is sent again to
    /// the restarted actor (so it may run twice). Default 0: such calls fail
    /// with [`Error::ActorDied`].
    pub fn max_task_retries(mut self, n: u32) -> Self {
        self.max_task_retries = n;
        self
    }
}

/// Longest actor name or namespace, in bytes.
pub const NAME_BYTES_MAX: usize = 256;

impl ActorOptions {
    /// Refuses names the head would refuse, before any work is done.
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |what: &str, value: &str| {
            Error::InvalidOptions(format!(
                "an actor {what} must be 1 to {NAME_BYTES_MAX} bytes (got {} bytes)",
                value.len()
            ))
        };
        if let Some(name) = &self.name {
            if name.is_empty() || name.len() > NAME_BYTES_MAX {
                return Err(bad("name", name));
            }
        }
        if self.namespace.is_empty() || self.namespace.len() > NAME_BYTES_MAX {
            return Err(bad("namespace", &self.namespace));
        }
        self.scheduling.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_namespaces_past_the_limit_are_refused_before_any_work() {
        let at_limit = "n".repeat(NAME_BYTES_MAX);
        assert!(ActorOptions::new().name(at_limit.clone()).check().is_ok());
        assert!(ActorOptions::new().namespace(at_limit).check().is_ok());
        let long = "n".repeat(NAME_BYTES_MAX + 1);
        for options in [
            ActorOptions::new().name(long.clone()),
            ActorOptions::new().namespace(long),
            ActorOptions::new().name(""),
        ] {
            assert!(
                matches!(options.check(), Err(Error::InvalidOptions(ref m)) if m.contains("bytes")),
                "{options:?}"
            );
        }
    }
}
