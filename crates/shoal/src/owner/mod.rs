//! The owner side of the SDK as state machines with no I/O: the process
//! that submits a task owns it and its result. Public (hidden) so the
//! cluster simulation (`shoal-sim`) drives the same machines; not a stable
//! API.
//!
//! - [`leases`]: workers leased per scheduling class, and the tasks waiting
//!   for a place on one;
//! - [`tasks`]: a task's tries, retries and rebuilds from lineage;
//! - [`calls`]: an actor call's tries: resends, retries on a new
//!   incarnation, failing;
//! - [`objects`]: the objects this process owns or caches, and its
//!   reference counts.
//!
//! Each takes events (a lease granted, a task answered, a worker lost, a
//! reference dropped) and gives back what to do (push, ask for a lease,
//! return one, free an object), which the shell in `core` carries out. The
//! unit tests walk them through retries, lost replies and node deaths with
//! no runtime.

pub mod calls;
pub mod leases;
pub mod objects;
pub mod tasks;
