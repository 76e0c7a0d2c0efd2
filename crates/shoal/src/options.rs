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

    /// GPUs held while it runs: a fraction below one shares a device
    /// (`0.5`: two such share one), more are whole devices. The worker sees
    /// exactly its devices in `CUDA_VISIBLE_DEVICES` and in
    /// `shoal::context()?.gpu_ids`.
    pub fn num_gpus(mut self, n: f64) -> Self {
        self.scheduling.num_gpus(&mut self.resources, n);
        self
    }

    /// Only nodes whose labels match every pair run it: `("zone", "a")`,
    /// `("zone", "!a")`, `("zone", "in(a,b)")`, `("zone", "!in(a,b)")`. If
    /// no node matches, it waits and is reported infeasible (`shoal
    /// status`).
    pub fn label_selector(mut self, pairs: &[(&str, &str)]) -> Self {
        self.scheduling.selector(pairs, false);
        self
    }

    /// Nodes whose labels match every pair are preferred while one fits;
    /// others are used otherwise.
    pub fn label_selector_soft(mut self, pairs: &[(&str, &str)]) -> Self {
        self.scheduling.selector(pairs, true);
        self
    }

    /// How a node is picked (see [`Strategy`](crate::Strategy)).
    pub fn scheduling(mut self, strategy: crate::Strategy) -> Self {
        self.scheduling.strategy(strategy);
        self
    }
}
