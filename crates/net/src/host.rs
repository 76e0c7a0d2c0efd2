//! This host as other processes see it: the IP it is reached on, and the
//! identity that tells two processes they share it (and, for people, its
//! name).
//!
//! The rule (docs/architecture.md, "Addresses"): any address handed to
//! another process is the host's advertised IP: the one given (`--node-ip`,
//! `Config::node_ip`, `SHOAL_NODE_IP`), else the local address of the route
//! to the head, else the primary interface's. Never loopback or unspecified
//! unless given so on purpose (a single-host cluster on 127.0.0.1), or when
//! the host has no other interface at all.
//!
//! Loopback, the same-host socket and mapping another process's store
//! files are shortcuts: a process takes them only when it knows the peer is
//! on its host. For sockets that is an IP assigned to an interface of this
//! network namespace ([`is_local_ip`]): such a connection never leaves the
//! namespace, exactly like loopback. For files it is [`host_id`], which
//! nodes report when they register.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use crate::error::ConnectError;

/// The IP to advertise: `given` if set, else the local address of the route
/// to `head` (when the head is not on loopback), else [`primary_ip`], else
/// loopback (a host with no other interface).
pub fn advertised_ip(given: Option<IpAddr>, head: Option<SocketAddr>) -> IpAddr {
    if let Some(ip) = given {
        return ip;
    }
    head.and_then(route_ip)
        .or_else(primary_ip)
        .unwrap_or_else(|| {
            tracing::warn!(
                "this host has no IPv4 address but loopback: advertising 127.0.0.1, which no \
             other host can reach (give --node-ip or SHOAL_NODE_IP)"
            );
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        })
}

/// The local IP this host uses to reach `peer`, unless the peer is on
/// loopback or unspecified (then the route says nothing about how others
/// reach us). No packet is sent: connecting a UDP socket only picks a route.
pub fn route_ip(peer: SocketAddr) -> Option<IpAddr> {
    if peer.ip().is_loopback() || peer.ip().is_unspecified() {
        return None;
    }
    let unspecified: SocketAddr = if peer.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(unspecified).ok()?;
    socket.connect(peer).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// What other machines most likely reach this one on: the source address
/// of the default route (the route to a public address; no packet is
/// sent), else the first IPv4 address of an interface that is up and
/// running, not loopback, not link-local and not a local bridge (Docker's
/// `docker0`, libvirt's `virbr0` and the like, which every such host has).
pub fn primary_ip() -> Option<IpAddr> {
    // A public address, only to pick the default route's source.
    if let Some(ip) = route_ip(SocketAddr::from(([8, 8, 8, 8], 53))) {
        if !is_link_local(ip) {
            return Some(ip);
        }
    }
    use nix::net::if_::InterfaceFlags;
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let mut found = addrs.filter(|a| {
        a.flags.contains(InterfaceFlags::IFF_UP)
            && a.flags.contains(InterfaceFlags::IFF_RUNNING)
            && !a.flags.contains(InterfaceFlags::IFF_LOOPBACK)
    });
    found.find_map(|a| {
        let ip = IpAddr::V4(a.address?.as_sockaddr_in()?.ip());
        (!is_link_local(ip) && !is_local_bridge(&a.interface_name)).then_some(ip)
    })
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Bridges and virtual links a host makes for its own containers or VMs.
fn is_local_bridge(name: &str) -> bool {
    [
        "docker", "br-", "virbr", "veth", "cni", "flannel", "podman", "lxc",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
}

/// True when `ip` is loopback or assigned to an interface of this network
/// namespace: a connection to it stays on this host, and an abstract Unix
/// socket bound here is the one a server on that address bound.
pub fn is_local_ip(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    if ip.is_unspecified() {
        return false;
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    addrs.into_iter().any(|a| {
        a.address.is_some_and(|s| {
            s.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()) == ip)
                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()) == ip))
                .unwrap_or(false)
        })
    })
}

/// This host's identity: a digest of the kernel's boot id, the network
/// namespace and the `/dev/shm` this process sees. Two processes with the
/// same id share loopback, abstract sockets and shared memory; containers
/// and network namespaces on one machine get different ids, as separate
/// machines do. Not a secret: it only picks shortcuts, never grants access.
pub fn host_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let netns = std::fs::read_link("/proc/self/ns/net")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let shm = std::fs::metadata("/dev/shm")
            .map(|m| format!("{}:{}", m.dev(), m.ino()))
            .unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [boot.trim(), &netns, &shm] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part.as_bytes());
        }
        shoal_proto::hex::encode(&ctx.finish().as_ref()[..12])
    })
}

/// The first socket address `address` (`host:port`) resolves to.
pub async fn resolve(address: &str) -> Result<SocketAddr, ConnectError> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|source| ConnectError::Resolve {
            addr: address.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| ConnectError::Unresolved {
            addr: address.to_string(),
        })
}

/// This host's name as the kernel has it (a container's own), for people
/// reading `shoal status` and logs; `"unknown"` if it cannot be read. Never
/// used to decide that two processes share a host: see [`host_id`].
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_ip_wins_and_loopback_heads_say_nothing_of_the_route() {
        let given: IpAddr = "198.18.0.7".parse().expect("ip");
        assert_eq!(advertised_ip(Some(given), None), given);
        assert_eq!(route_ip(([127, 0, 0, 1], 6380).into()), None);
        assert_eq!(route_ip(([0, 0, 0, 0], 6380).into()), None);
        // Without a route to a real head, the primary interface (or, on a
        // host with none, loopback).
        let ip = advertised_ip(None, Some(([127, 0, 0, 1], 6380).into()));
        assert_eq!(ip, primary_ip().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn local_ips_are_this_hosts_and_others_are_not() {
        assert!(is_local_ip(Ipv4Addr::LOCALHOST.into()));
        assert!(!is_local_ip(Ipv4Addr::UNSPECIFIED.into()));
        if let Some(primary) = primary_ip() {
            assert!(is_local_ip(primary), "{primary}");
        }
        // A test-net address no interface here has.
        assert!(!is_local_ip("198.51.100.77".parse().expect("ip")));
    }

    #[test]
    fn local_bridges_and_link_local_addresses_are_not_advertised() {
        assert!(is_local_bridge("docker0"));
        assert!(is_local_bridge("br-96996bea493d"));
        assert!(is_local_bridge("virbr0"));
        assert!(!is_local_bridge("eth0"));
        assert!(!is_local_bridge("enp3s0"));
        assert!(is_link_local("169.254.3.4".parse().expect("ip")));
        assert!(!is_link_local("198.18.0.2".parse().expect("ip")));
        if let Some(ip) = primary_ip() {
            assert!(!ip.is_loopback() && !is_link_local(ip), "{ip}");
        }
    }

    #[test]
    fn the_host_id_is_stable_and_short() {
        assert_eq!(host_id(), host_id());
        assert_eq!(host_id().len(), 24);
    }

    #[tokio::test]
    async fn addresses_resolve_or_say_why() {
        let addr = resolve("127.0.0.1:6380").await.expect("resolves");
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], 6380)));
        let err = resolve("no port here").await.expect_err("no port");
        assert!(matches!(err, ConnectError::Resolve { .. }), "{err}");
        assert!(err.to_string().contains("no port here"), "{err}");
    }

    #[test]
    fn the_hostname_is_one_trimmed_line() {
        let name = hostname();
        assert!(!name.is_empty());
        assert_eq!(name, name.trim());
        assert!(!name.contains('\n'));
    }
}
