//! The head's tables in Redis (`shoal start --head --head-store
//! redis://HOST:PORT`), for a head that another machine can take over, as
//! Ray keeps its control store in Redis for fault tolerance.
//!
//! Each table is a Redis hash, `shoal:{cluster id}:{table}`. Two heads never
//! serve one cluster: the store holds a lease, `shoal:{cluster id}:lease`, a
//! key with a time to live whose value names the holder and its incarnation
//! (`{incarnation}:{random id}`). A head takes it with `SET NX` before it
//! loads anything (waiting up to two lease times for a dead head's lease to
//! lapse), renews it every second, and every commit is a Lua script that
//! applies the writes only while the lease is still the head's own. A head
//! that finds the lease gone or another's stops.
//!
//! Durability is the Redis server's: run it with `appendonly yes` and
//! `appendfsync always` for a write to be on disk before the head answers.
//!
//! The client speaks the small part of RESP (the Redis protocol) this needs:
//! commands as arrays of bulk strings, five kinds of reply, every length
//! bounded. (The `redis` crate would bring 34 crates, the URL and Unicode
//! normalisation stack among them, for this.)

use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use shoal_proto::ClusterId;
use tracing::{info, warn};

use crate::store::{Backend, Snapshot, StoreError, Table, Write};

/// How long a head's lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// Longest wait for a Redis reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest bulk string accepted (an executable is at most 2 GiB).
const BULK_BYTES_MAX: usize = (2 << 30) + 1024;
/// Most elements of one array reply.
const ARRAY_ITEMS_MAX: usize = 10_000_000;
/// Deepest nesting of array replies.
const DEPTH_MAX: usize = 4;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

fn io_error(what: &'static str) -> impl Fn(std::io::Error) -> StoreError {
    move |e| StoreError::backend(what, e)
}

/// One connection to a Redis server.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(target: &Target) -> Result<Self, StoreError> {
        let stream = TcpStream::connect(target.address.as_str())
            .map_err(|e| StoreError::backend("connect", format!("{}: {e}", target.address)))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(io_error("connect"))?;
        let writer = stream.try_clone().map_err(io_error("connect"))?;
        let mut conn = Self {
            reader: BufReader::new(stream),
            writer,
        };
        if let Some(password) = &target.password {
            conn.ok(&[b"AUTH", password.as_bytes()])?;
        }
        if target.db != 0 {
            conn.ok(&[b"SELECT", target.db.to_string().as_bytes()])?;
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply.
    fn call(&mut self, args: &[&[u8]]) -> Result<Reply, StoreError> {
        let mut out = Vec::with_capacity(64 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&out).map_err(io_error("send"))?;
        read_reply(&mut self.reader, 0)
    }

    /// A command whose reply must not be an error.
    fn ok(&mut self, args: &[&[u8]]) -> Result<Reply, StoreError> {
        match self.call(args)? {
            Reply::Error(e) => Err(StoreError::backend("command", e)),
            reply => Ok(reply),
        }
    }
}

fn read_line(reader: &mut impl BufRead) -> Result<String, StoreError> {
    let mut line = Vec::new();
    // A line is a type byte and a number or a short status: 1 KiB bounds it.
    reader
        .by_ref()
        .take(1024)
        .read_until(b'\n', &mut line)
        .map_err(io_error("read"))?;
    if !line.ends_with(b"\r\n") {
        return Err(StoreError::backend("read", "a reply line without CRLF"));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| StoreError::backend("read", "a reply line not UTF-8"))
}

fn read_reply(reader: &mut impl BufRead, depth: usize) -> Result<Reply, StoreError> {
    let line = read_line(reader)?;
    let (kind, rest) = line.split_at(line.len().min(1));
    let number = || -> Result<i64, StoreError> {
        rest.parse()
            .map_err(|_| StoreError::backend("read", format!("bad number {rest:?}")))
    };
    match kind {
        "+" => Ok(Reply::Simple(rest.to_string())),
        "-" => Ok(Reply::Error(rest.to_string())),
        ":" => Ok(Reply::Int(number()?)),
        "$" => {
            let n = number()?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > BULK_BYTES_MAX {
                return Err(StoreError::backend("read", format!("a {n} byte reply")));
            }
            let mut data = vec![0u8; n + 2];
            reader.read_exact(&mut data).map_err(io_error("read"))?;
            if !data.ends_with(b"\r\n") {
                return Err(StoreError::backend("read", "a bulk reply without CRLF"));
            }
            data.truncate(n);
            Ok(Reply::Bulk(Some(data)))
        }
        "*" => {
            let n = number()?;
            if n < 0 {
                return Ok(Reply::Array(None));
            }
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > ARRAY_ITEMS_MAX || depth >= DEPTH_MAX {
                return Err(StoreError::backend(
                    "read",
                    "an array reply too large or deep",
                ));
            }
            let mut items = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                items.push(read_reply(reader, depth + 1)?);
            }
            Ok(Reply::Array(Some(items)))
        }
        _ => Err(StoreError::backend(
            "read",
            format!("unknown reply type {kind:?}"),
        )),
    }
}

/// Where the server is, from `redis://[:PASSWORD@]HOST:PORT[/DB]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    address: String,
    password: Option<String>,
    db: u32,
}

impl Target {
    /// Parses a `redis://` URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| format!("{url:?}: expected redis://[:PASSWORD@]HOST:PORT[/DB]"))?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let password = auth.map(|a| a.strip_prefix(':').unwrap_or(a).to_string());
        let (address, db) = match rest.split_once('/') {
            Some((address, "")) => (address, 0),
            Some((address, db)) => (
                address,
                db.parse()
                    .map_err(|_| format!("{url:?}: the database must be a number"))?,
            ),
            None => (rest, 0),
        };
        let port_ok = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("{url:?}: expected HOST:PORT after redis://"));
        }
        Ok(Self {
            address: address.to_string(),
            password,
            db,
        })
    }
}

/// Applies writes while the lease is ours: KEYS[1] the lease, ARGV[1] its
/// value, ARGV[2] its time to live in ms, then `P hash field value` and
/// `D hash field` groups.
const COMMIT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('SHOAL_LEASE_LOST')
end
local i = 3
while i <= #ARGV do
  if ARGV[i] == 'P' then
    redis.call('HSET', ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  else
    redis.call('HDEL', ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Renews the lease if it is ours; sets it to ARGV[3] when given.
const KEEP: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
";

/// The Redis backend.
pub struct Redis {
    target: Target,
    conn: Option<Conn>,
    prefix: String,
    /// The lease's value while this head holds it.
    lease: String,
    ttl: Duration,
}

impl Redis {
    /// A backend for `cluster`'s tables on the server at `url`; nothing is
    /// sent until [`Backend::load`] takes the lease.
    pub fn new(url: &str, cluster: ClusterId, ttl: Duration) -> Result<Self, StoreError> {
        let target = Target::parse(url).map_err(|e| StoreError::backend("url", e))?;
        let id = shoal_proto::ids::Uuid::new_v4().simple().to_string();
        Ok(Self {
            target,
            conn: None,
            prefix: format!("shoal:{cluster}:"),
            lease: id,
            ttl,
        })
    }

    fn lease_key(&self) -> String {
        format!("{}lease", self.prefix)
    }

    fn table_key(&self, table: Table) -> String {
        format!("{}{}", self.prefix, table.name())
    }

    fn ttl_ms(&self) -> String {
        self.ttl.as_millis().to_string()
    }

    /// A command on the connection, dialling again once if it broke.
    fn call(&mut self, args: &[&[u8]]) -> Result<Reply, StoreError> {
        for tried in 0..2 {
            if self.conn.is_none() {
                self.conn = Some(Conn::open(&self.target)?);
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            match conn.call(args) {
                Ok(reply) => return Ok(reply),
                Err(e) if tried == 0 => {
                    warn!(error = %e, "lost the connection to Redis; dialling again");
                    self.conn = None;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::backend("command", "no connection"))
    }

    /// Takes the lease, waiting up to two lease times for another head's
    /// to lapse.
    fn acquire(&mut self) -> Result<(), StoreError> {
        let key = self.lease_key();
        let ttl = self.ttl_ms();
        let lease = self.lease.clone();
        let deadline = Instant::now() + self.ttl * 2 + Duration::from_secs(1);
        let mut said = false;
        loop {
            let reply = self.call(&[
                b"SET",
                key.as_bytes(),
                lease.as_bytes(),
                b"NX",
                b"PX",
                ttl.as_bytes(),
            ])?;
            match reply {
                Reply::Simple(ok) if ok == "OK" => return Ok(()),
                Reply::Error(e) => return Err(StoreError::backend("lease", e)),
                _ => {}
            }
            let holder = match self.call(&[b"GET", key.as_bytes()])? {
                Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).into_owned(),
                _ => String::new(),
            };
            if Instant::now() >= deadline {
                return Err(StoreError::Taken(format!(
                    "head {holder} holds the lease in Redis"
                )));
            }
            if !std::mem::replace(&mut said, true) {
                info!(%holder, "another head holds the store's lease; waiting for it to lapse");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn keep_as(&mut self, new_value: Option<&str>) -> Result<(), StoreError> {
        let key = self.lease_key();
        let ttl = self.ttl_ms();
        let lease = self.lease.clone();
        let mut args: Vec<&[u8]> = vec![
            b"EVAL",
            KEEP.as_bytes(),
            b"1",
            key.as_bytes(),
            lease.as_bytes(),
            ttl.as_bytes(),
        ];
        if let Some(v) = new_value {
            args.push(v.as_bytes());
        }
        match self.call(&args)? {
            Reply::Int(1) => {
                if let Some(v) = new_value {
                    self.lease = v.to_string();
                }
                Ok(())
            }
            Reply::Error(e) => Err(StoreError::backend("lease", e)),
            _ => Err(StoreError::Taken(
                "the lease lapsed or another head took it".into(),
            )),
        }
    }
}

impl Backend for Redis {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.acquire()?;
        let mut snapshot = Snapshot::new();
        for table in Table::ALL {
            let key = self.table_key(table);
            let reply = self.call(&[b"HGETALL", key.as_bytes()])?;
            let items = match reply {
                Reply::Array(Some(items)) => items,
                Reply::Error(e) => return Err(StoreError::backend("read table", e)),
                _ => Vec::new(),
            };
            let rows = snapshot.entry(table).or_default();
            let mut items = items.into_iter();
            while let (Some(Reply::Bulk(Some(k))), Some(Reply::Bulk(Some(v)))) =
                (items.next(), items.next())
            {
                rows.push((k, v));
            }
        }
        // Tagged with this head's incarnation (the stored one, plus one).
        let before = snapshot
            .get(&Table::Meta)
            .and_then(|rows| rows.iter().find(|(k, _)| k == b"incarnation"))
            .and_then(|(_, v)| crate::store::decode::<u64>(Table::Meta, v))
            .unwrap_or(0);
        let tagged = format!("{}:{}", before + 1, self.lease);
        self.keep_as(Some(&tagged))?;
        info!(lease = %self.lease, "holding the store's lease in Redis");
        Ok(snapshot)
    }

    fn commit(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        let key = self.lease_key();
        let ttl = self.ttl_ms();
        let lease = self.lease.clone();
        let tables: Vec<(Table, String)> = Table::ALL
            .into_iter()
            .map(|t| (t, self.table_key(t)))
            .collect();
        let table_key = |t: Table| {
            tables
                .iter()
                .find(|(x, _)| *x == t)
                .map(|(_, k)| k.as_bytes())
                .unwrap_or_default()
        };
        let mut args: Vec<&[u8]> = vec![
            b"EVAL",
            COMMIT.as_bytes(),
            b"1",
            key.as_bytes(),
            lease.as_bytes(),
            ttl.as_bytes(),
        ];
        for write in writes {
            match write {
                Write::Put(t, k, v) => args.extend([b"P".as_slice(), table_key(*t), k, v]),
                Write::Delete(t, k) => args.extend([b"D".as_slice(), table_key(*t), k]),
            }
        }
        match self.call(&args)? {
            Reply::Int(1) => Ok(()),
            Reply::Error(e) if e.contains("SHOAL_LEASE_LOST") => Err(StoreError::Taken(
                "the lease lapsed or another head took it".into(),
            )),
            Reply::Error(e) => Err(StoreError::backend("commit", e)),
            other => Err(StoreError::backend("commit", format!("{other:?}"))),
        }
    }

    fn keep(&mut self) -> Result<(), StoreError> {
        self.keep_as(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Reply, StoreError> {
        read_reply(&mut std::io::Cursor::new(bytes.to_vec()), 0)
    }

    #[test]
    fn replies_parse_and_bad_ones_are_refused_before_allocating() {
        assert_eq!(parse(b"+OK\r\n").ok(), Some(Reply::Simple("OK".into())));
        assert_eq!(parse(b":42\r\n").ok(), Some(Reply::Int(42)));
        assert_eq!(parse(b"$-1\r\n").ok(), Some(Reply::Bulk(None)));
        assert_eq!(
            parse(b"*2\r\n$1\r\na\r\n$0\r\n\r\n").ok(),
            Some(Reply::Array(Some(vec![
                Reply::Bulk(Some(b"a".to_vec())),
                Reply::Bulk(Some(Vec::new()))
            ])))
        );
        assert_eq!(
            parse(b"-ERR no\r\n").ok(),
            Some(Reply::Error("ERR no".into()))
        );
        // A 4 GiB bulk, a 2^32 item array, deep nesting, garbage: errors.
        assert!(parse(b"$4294967296\r\n").is_err());
        assert!(parse(b"*4294967296\r\n").is_err());
        assert!(parse(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n").is_err());
        assert!(parse(b"?\r\n").is_err());
        assert!(parse(b"$3\r\nab").is_err());
        assert!(parse(&[b'+'; 5000]).is_err());
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:6379"),
            Ok(Target {
                address: "127.0.0.1:6379".into(),
                password: None,
                db: 0
            })
        );
        assert_eq!(
            Target::parse("redis://:secret@host:1/2"),
            Ok(Target {
                address: "host:1".into(),
                password: Some("secret".into()),
                db: 2
            })
        );
        assert!(Target::parse("http://host:1").is_err());
        assert!(Target::parse("redis://host").is_err());
        assert!(Target::parse("redis://host:1/x").is_err());
    }
}
