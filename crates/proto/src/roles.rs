//! Which roles may send each request: one table per service (the head's,
//! a node's and a worker's), checked by each service before anything else
//! ([`HeadRequest::rpc`](crate::HeadRequest::rpc) and the like).
//!
//! The match behind `rpc()` has no catch-all arm, so a new request does not
//! compile until it has its row here. A role is what the peer proved in its
//! `Hello` (with the join token, and for nodes serving other nodes a
//! certificate); a request's own fields (which node a heartbeat is for,
//! which job an executable belongs to) are checked against the connection
//! by the service that handles it.

use crate::hello::Role;

/// A request kind and the roles allowed to send it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rpc {
    /// The request's variant name.
    pub name: &'static str,
    /// The roles that may send it.
    pub roles: &'static [Role],
}

impl Rpc {
    /// Whether `role` may send this request.
    pub fn allows(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

macro_rules! rpc_table {
    (
        $(#[$doc:meta])*
        $table:ident for $request:path {
            $($variant:ident: [$($role:ident),*],)*
        }
    ) => {
        $(#[$doc])*
        pub const $table: &[Rpc] = &[
            $(Rpc { name: stringify!($variant), roles: &[$(Role::$role),*] },)*
        ];

        impl $request {
            #[doc = concat!("This request's row in [`", stringify!($table), "`].")]
            pub fn rpc(&self) -> Rpc {
                match self {
                    $(Self::$variant { .. } => Rpc {
                        name: stringify!($variant),
                        roles: &[$(Role::$role),*],
                    },)*
                }
            }
        }
    };
}

rpc_table! {
    /// The head's requests.
    HEAD_RPCS for crate::head::HeadRequest {
        RegisterNode: [Node],
        Heartbeat: [Node],
        UnregisterNode: [Node],
        GetClusterStatus: [Node, Driver, Worker, Client],
        RegisterJob: [Driver],
        UploadBinary: [Driver, Client],
        FetchBinary: [Node],
        RequestLease: [Driver, Worker],
        ReturnLease: [Driver, Worker],
        LeaseBlocked: [Node],
        RegisterActor: [Driver, Worker],
        GetActor: [Node, Driver, Worker, Client],
        ActorRestarted: [Node],
        GetNamedActor: [Node, Driver, Worker, Client],
        KillActor: [Driver, Worker, Client],
        ListActors: [Node, Driver, Worker, Client],
        CreatePlacementGroup: [Driver, Worker],
        WaitPlacementGroup: [Driver, Worker, Client],
        RemovePlacementGroup: [Driver, Worker, Client],
        GetNamedPlacementGroup: [Driver, Worker, Client],
        ListObjects: [Node, Driver, Worker, Client],
        TaskEvents: [Driver, Worker],
        ListState: [Node, Driver, Worker, Client],
        Summarize: [Node, Driver, Worker, Client],
        LocateObject: [Node, Driver, Worker, Client],
        SubmitJob: [Driver, Client],
        JobLogs: [Driver, Client],
        StopJob: [Driver, Client],
        FinishJob: [Driver],
        RejoinNode: [Node],
        KvPut: [Driver, Worker, Client],
        KvGet: [Driver, Worker, Client],
        KvDelete: [Driver, Worker, Client],
        KvKeys: [Driver, Worker, Client],
        WatchNodeDeaths: [Driver, Worker],
    }
}

rpc_table! {
    /// A node daemon's requests. Other nodes only read objects (a pull);
    /// clients (`shoal logs`) only read logs and the node's info.
    NODE_RPCS for crate::node::NodeRequest {
        Ping: [Node, Driver, Worker, Client],
        GetNodeInfo: [Node, Driver, Worker, Client],
        GrantWorker: [Driver, Worker],
        KillWorker: [Driver, Worker],
        ReleaseWorker: [Driver, Worker],
        RegisterWorker: [Worker],
        PutObject: [Driver, Worker],
        ReadObject: [Node, Driver, Worker],
        CreateObject: [Driver, Worker],
        SealObject: [Driver, Worker],
        OpenObject: [Driver, Worker],
        PullObject: [Driver, Worker],
        DeleteObjects: [Driver, Worker],
        WatchWorkers: [Driver, Worker],
        WorkerBlocked: [Driver, Worker],
        ListLogs: [Node, Driver, Worker, Client],
        ReadLog: [Node, Driver, Worker, Client],
    }
}

rpc_table! {
    /// A driver's or worker's requests (every SDK process serves them).
    /// Nodes start actors for the head (restarts) and forward workers'
    /// output to their driver.
    WORKER_RPCS for crate::worker::WorkerRequest {
        PushTask: [Driver, Worker],
        CreateActor: [Driver, Worker, Node],
        ActorCall: [Driver, Worker],
        Logs: [Node],
        GetObject: [Driver, Worker],
        CancelTask: [Driver, Worker],
        GeneratorItem: [Driver, Worker],
        ReleaseBorrow: [Driver, Worker],
        CancelObject: [Driver, Worker],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_names_a_distinct_request_with_a_role() {
        for table in [HEAD_RPCS, NODE_RPCS, WORKER_RPCS] {
            let mut names: Vec<&str> = table.iter().map(|r| r.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), table.len());
            assert!(table.iter().all(|r| !r.roles.is_empty()));
        }
        let ping = crate::NodeRequest::Ping.rpc();
        assert_eq!(ping.name, "Ping");
        assert!(ping.allows(Role::Client));
        assert!(!crate::HeadRequest::GetClusterStatus.rpc().roles.is_empty());
    }
}
