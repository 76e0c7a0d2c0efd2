//! A real `redis-server` for the tests of the head's Redis store (Debian's
//! package; `.ci/run` installs it).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` on a free loopback port with its own directory,
/// writing every change to its append-only file before answering; stopped
/// when dropped.
pub struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one and waits until it answers a `PING`. The free port is
    /// found by binding it and letting it go, so another process may take
    /// it first: a server that exits (it could not bind), or a port where
    /// something else answers, is tried again on another port.
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            if let Some(server) = Self::try_start() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    fn try_start() -> Option<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::try_start_on(port)
    }

    /// A server on `port`, once it answers; `None` if it exits first (or
    /// does not answer within 20 s).
    fn try_start_on(port: u16) -> Option<RedisServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("these tests need redis-server (apt-get install redis-server)");
        let mut server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if server.pong() {
                return Some(server);
            }
            if !matches!(server.child.try_wait(), Ok(None)) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether our server answers `PING` on its port.
    fn pong(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut answer = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// Its `redis://` URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a CI run met: the port found free was taken by another process
    /// before redis-server bound it. A connection succeeds there (the old
    /// readiness check, so the head was then sent to a dead port), but no
    /// redis answers: the server is not taken as started.
    #[test]
    fn a_port_taken_by_something_else_is_not_taken_for_a_started_server() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let port = squatter.local_addr().expect("addr").port();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(RedisServer::try_start_on(port).is_none());
        let server = RedisServer::start();
        assert!(server.pong());
    }
}
