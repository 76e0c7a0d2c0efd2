//! Placement groups: sets of resource bundles reserved together across the
//! cluster (all or none), that tasks and actors are then placed in, as in
//! Ray.
//!
//! ```no_run
//! use shoal::{Bundle, PlacementStrategy, Strategy};
//! # #[shoal::remote] fn train(shard: u32) -> u32 { shard }
//! # fn main() -> shoal::Result<()> {
//! # let _shoal = shoal::init(shoal::Config::from_env())?;
//! let pg = shoal::placement_group(
//!     vec![Bundle::new().cpus(1.0).gpus(1.0); 2],
//!     PlacementStrategy::StrictSpread,
//! )?;
//! assert!(pg.wait(std::time::Duration::from_secs(30))?, "two nodes with a GPU each");
//! let shards: Vec<_> = (0..2)
//!     .map(|i| train::options().num_gpus(1.0).scheduling(Strategy::placement_group(&pg, Some(i))).remote(i))
//!     .collect();
//! shoal::get_all(&shards)?;
//! shoal::remove_placement_group(&pg)?;
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_proto::placement::{GroupState, PlacementGroupInfo, PlacementGroupSpec};
use shoal_proto::resources::{CPU, GPU, MEMORY};
use shoal_proto::{HeadReply, HeadRequest, PlacementGroupId, ResourceSet};

pub use shoal_proto::placement::PlacementStrategy;

use crate::error::{Error, Result};

/// How long one request to the head may wait for a group.
const WAIT_STEP: Duration = Duration::from_secs(10);
/// Deadline of a request that does not wait.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One bundle of a placement group: resources reserved together on one
/// node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bundle(ResourceSet);

impl Bundle {
    /// An empty bundle; give it resources with the methods below.
    pub fn new() -> Self {
        Self::default()
    }

    /// CPUs.
    pub fn cpus(mut self, n: f64) -> Self {
        self.0.set(CPU, n);
        self
    }

    /// GPUs.
    pub fn gpus(mut self, n: f64) -> Self {
        self.0.set(GPU, n);
        self
    }

    /// Memory, in bytes.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.0.set(MEMORY, bytes as f64);
        self
    }

    /// A custom resource.
    pub fn resource(mut self, name: &str, quantity: f64) -> Self {
        self.0.set(name, quantity);
        self
    }

    /// Its resources.
    pub fn resources(&self) -> &ResourceSet {
        &self.0
    }
}

/// Options of a placement group's creation.
#[derive(Clone, Debug, Default)]
pub struct PlacementGroupOptions {
    name: Option<String>,
    detached: bool,
}

impl PlacementGroupOptions {
    /// No name; removed with its job.
    pub fn new() -> Self {
        Self::default()
    }

    /// A name, unique among live groups, for
    /// [`get_placement_group`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The group outlives its creator's job, until removed.
    pub fn lifetime_detached(mut self) -> Self {
        self.detached = true;
        self
    }
}

/// A placement group: a handle that can be cloned and sent to tasks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlacementGroup {
    id: PlacementGroupId,
    bundles: u32,
    /// Known created already (no need to ask the head).
    #[serde(skip)]
    created: Arc<AtomicBool>,
}

impl PartialEq for PlacementGroup {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl PlacementGroup {
    fn from_info(info: &PlacementGroupInfo) -> Self {
        Self {
            id: info.spec.group_id,
            bundles: info.spec.bundles.len() as u32,
            created: Arc::new(AtomicBool::new(info.state == GroupState::Created)),
        }
    }

    /// The group's id.
    pub fn id(&self) -> PlacementGroupId {
        self.id
    }

    /// How many bundles it has.
    pub fn bundle_count(&self) -> u32 {
        self.bundles
    }

    /// Waits up to `timeout` for every bundle to be reserved: true once
    /// they are, false if the time ran out first (the group still waits
    /// for room; `shoal status` lists it). An error if it was removed.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        if self.created.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let core = crate::driver::ensure_core();
        let core2 = Arc::clone(&core);
        let id = self.id;
        // (A timeout too long to add is as good as forever.)
        let until = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        let info = core.block_on(async move {
            loop {
                let left = until.saturating_duration_since(Instant::now());
                let ask = HeadRequest::WaitPlacementGroup {
                    group_id: id,
                    wait_ms: left.min(WAIT_STEP).as_millis() as u64,
                };
                let info = group_reply(
                    core2
                        .head
                        .call_idempotent(&ask, left.min(WAIT_STEP) + CALL_TIMEOUT)
                        .await?,
                )?;
                if info.state != GroupState::Pending && info.state != GroupState::Rescheduling
                    || left.is_zero()
                {
                    return Ok(info);
                }
            }
        })?;
        match info.state {
            GroupState::Created => {
                self.created.store(true, Ordering::Relaxed);
                Ok(true)
            }
            GroupState::Removed => {
                Err(Error::NotFound(format!("placement group {id} was removed")))
            }
            GroupState::Pending | GroupState::Rescheduling => Ok(false),
        }
    }

    /// The group's record as the head has it now: its state and where each
    /// bundle is.
    pub fn info(&self) -> Result<PlacementGroupInfo> {
        let core = crate::driver::ensure_core();
        let core2 = Arc::clone(&core);
        let ask = HeadRequest::WaitPlacementGroup {
            group_id: self.id,
            wait_ms: 0,
        };
        core.block_on(
            async move { group_reply(core2.head.call_idempotent(&ask, CALL_TIMEOUT).await?) },
        )
    }
}

/// `Strategy::placement_group(&pg, ...)` takes the handle.
impl From<&PlacementGroup> for PlacementGroupId {
    fn from(group: &PlacementGroup) -> Self {
        group.id
    }
}

fn group_reply(reply: HeadReply) -> Result<PlacementGroupInfo> {
    match reply {
        HeadReply::PlacementGroup(info) => Ok(*info),
        other => Err(Error::Protocol(format!(
            "{other:?} in answer to a placement group request"
        ))),
    }
}

/// Creates a placement group of `bundles` laid out by `strategy`, removed
/// with this job. Its bundles are reserved as soon as the cluster has room
/// for all of them at once; [`PlacementGroup::wait`] waits for that.
pub fn placement_group(
    bundles: Vec<Bundle>,
    strategy: PlacementStrategy,
) -> Result<PlacementGroup> {
    placement_group_with(bundles, strategy, PlacementGroupOptions::new())
}

/// [`placement_group`] with a name or a detached lifetime.
pub fn placement_group_with(
    bundles: Vec<Bundle>,
    strategy: PlacementStrategy,
    options: PlacementGroupOptions,
) -> Result<PlacementGroup> {
    let core = crate::driver::ensure_core();
    let spec = PlacementGroupSpec {
        group_id: PlacementGroupId::random(),
        job_id: core.job_id,
        name: options.name,
        detached: options.detached,
        strategy,
        bundles: bundles.into_iter().map(|b| b.0).collect(),
    };
    spec.check()
        .map_err(|e| Error::InvalidOptions(e.to_string()))?;
    let core2 = Arc::clone(&core);
    let ask = HeadRequest::CreatePlacementGroup(Box::new(spec));
    let info = core.block_on(async move {
        group_reply(core2.head.call_idempotent(&ask, CALL_TIMEOUT).await?)
    })?;
    Ok(PlacementGroup::from_info(&info))
}

/// The live placement group named `name`.
pub fn get_placement_group(name: &str) -> Result<PlacementGroup> {
    let core = crate::driver::ensure_core();
    let core2 = Arc::clone(&core);
    let ask = HeadRequest::GetNamedPlacementGroup {
        name: name.to_string(),
    };
    let info = core.block_on(async move {
        group_reply(core2.head.call_idempotent(&ask, CALL_TIMEOUT).await?)
    })?;
    Ok(PlacementGroup::from_info(&info))
}

/// Removes a placement group: the tasks and actors running in it are
/// stopped (their callers see them fail), tasks waiting for it fail with
/// [`Error::Unschedulable`], and its resources are free again.
pub fn remove_placement_group(group: &PlacementGroup) -> Result<()> {
    let core = crate::driver::ensure_core();
    let core2 = Arc::clone(&core);
    let ask = HeadRequest::RemovePlacementGroup { group_id: group.id };
    core.block_on(
        async move { group_reply(core2.head.call_idempotent(&ask, CALL_TIMEOUT).await?) },
    )?;
    group.created.store(false, Ordering::Relaxed);
    Ok(())
}
