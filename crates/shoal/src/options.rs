//! Per-task options.

use shoal_proto::resources::CPU;
use shoal_proto::ResourceSet;

/// Resources and retry policy of one submission.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOptions {
    pub(crate) resources: ResourceSet,
    pub(crate) max_retries: u32,
    pub(crate) retry_exceptions: bool,
    pub(crate) scheduling: crate::scheduling::Scheduling,
    pub(crate) env: shoal_proto::EnvVars,
    pub(crate) timeout: Option<std::time::Duration>,
    pub(crate) generator_backpressure: u32,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl TaskOptions {
    /// One CPU, three retries on worker or node death, no retry on `Err`.
    pub fn new() -> Self {
        let mut resources = ResourceSet::new();
        resources.set(CPU, 1.0);
        Self {
            resources,
            max_retries: 3,
            retry_exceptions: false,
            scheduling: Default::default(),
            env: Default::default(),
            timeout: None,
            generator_backpressure: 16,
        }
    }

    /// CPUs held while the task runs.
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.resources.set(CPU, n);
        self
    }

    /// Retries if the worker or node dies.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Also retry when the function returns `Err` or panics.
    pub fn retry_exceptions(mut self, yes: bool) -> Self {
        self.retry_exceptions = yes;
        self
    }

    /// A custom resource held while the task runs.
    pub fn resource(mut self, name: &str, quantity: f64) -> Self {
        self.resources.set(name, quantity);
        self
    }

    crate::scheduling::placement_options!("held while it runs");

    /// For a streaming generator: how many items the producer may be
    /// ahead of the caller before it waits (default 16, at least 1).
    pub fn generator_backpressure(mut self, items: u32) -> Self {
        self.generator_backpressure = items.max(1);
        self
    }

    /// Past this long after its submission, the task is cancelled
    /// (cooperatively, as `shoal::cancel` does) and its reference gives
    /// [`Error::Timeout`](crate::Error::Timeout).
    pub fn timeout(mut self, after: std::time::Duration) -> Self {
        self.timeout = Some(after);
        self
    }

    /// Sets `name` to `value` in the environment of the worker process
    /// that runs the task, over the job's default (`Config::env_var`); the
    /// tasks it submits inherit it. Workers are only shared between tasks
    /// asking for the same environment. A name that is not
    /// `[A-Za-z_][A-Za-z0-9_]*`, or starts with `SHOAL_`, fails the task
    /// with `Error::InvalidOptions`.
    pub fn env_var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.set(name, value);
        self
    }
}
