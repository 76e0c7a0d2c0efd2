//! Fault injection in the RPC client, for tests of retry and recovery paths
//! (in the spirit of Ray's `testing_rpc_failure`).
//!
//! Off unless the environment variable `SHOAL_TESTING_RPC_FAILURE` holds a
//! spec when the process first needs it (its first connection through a
//! [`Transport`](crate::Transport), or an explicit call to [`global`]); it
//! is read once and never again. For example:
//!
//! ```text
//! SHOAL_TESTING_RPC_FAILURE="RequestLease=req:1,rep:1;Heartbeat=rep:0.05"
//! ```
//!
//! drops the first `RequestLease` request before it is sent, discards the
//! reply to the first `RequestLease` that was sent, and discards each
//! `Heartbeat` reply with probability 0.05.
//!
//! # Spec format
//! `;`-separated rules `Method=item[,item]`:
//! - `Method` is the request's variant name (`RequestLease`, `Heartbeat`,
//!   `GrantWorker`, ...), or `*` for every method without a rule of its own
//!   (a method's own rule replaces the `*` rule entirely).
//! - An item is `req:X` (drop the request before it is sent: the call fails
//!   at once and the server never sees it) or `rep:X` (send the request, let
//!   the server handle it, then discard its reply: the call fails although
//!   the handler ran). Each at most once per rule.
//! - `X` an integer >= 1 is a count: the first `X` exchanges of that method
//!   in this process; `X` a fraction in (0, 1) is a probability, drawn for
//!   each exchange.
//! - `rep:` counts and draws only over the requests actually sent, so
//!   `M=req:1,rep:1` fails the first attempt at `M` one way and the second
//!   the other, and the third goes through.
//!
//! A failed exchange returns [`RpcError::Injected`](crate::RpcError::Injected),
//! which is not a lost connection: callers retry as after a timeout. Spaces
//! around parts are allowed; empty rules are skipped.
//!
//! A spec that does not parse (or a bad seed) is **refused**: nothing is
//! installed, the process runs with no faults, and the reason is printed to
//! stderr and logged with `tracing::error!`. It never panics.
//!
//! # Seed
//! Probabilities come from a small deterministic generator (splitmix64)
//! seeded from `SHOAL_TESTING_RPC_FAILURE_SEED` (a u64), or else from the
//! clock and the process id. The seed in use is printed once, to stderr and
//! with `tracing::warn!`:
//!
//! ```text
//! shoal: SHOAL_TESTING_RPC_FAILURE active (Heartbeat=rep:0.05), seed 1234
//! ```
//!
//! so a failing run can be replayed with the same seed (the same sequence of
//! decisions per process, as far as the order of requests is the same).
//! Counters are per method and per `req`/`rep`, for the whole process.
//!
//! # Cost when off
//! Each [`RpcClient`](crate::rpc::RpcClient) captures the process's plan when
//! it connects; a request then costs one `None` check. Only when a plan is
//! active is the request encoded a second time to read its variant name.
//!
//! # Tests
//! The decision logic works on an explicit [`Faults`] value, and a test gives
//! one to its own client with
//! [`RpcClient::with_faults`](crate::rpc::RpcClient::with_faults), so tests
//! running in parallel in one process never share a plan or its counters.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::sync::MutexExt;

use serde::Serialize;
use tracing::{error, info, warn};

/// The environment variable holding the spec.
pub const ENV_SPEC: &str = "SHOAL_TESTING_RPC_FAILURE";

/// The environment variable holding the seed (a u64).
pub const ENV_SEED: &str = "SHOAL_TESTING_RPC_FAILURE_SEED";

/// The method name used when a request's variant name cannot be read.
pub const UNKNOWN_METHOD: &str = "?";

/// A fault spec (or its seed) that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FaultSpecError {
    /// A rule has no `=`.
    #[error("rule {rule:?}: expected Method=item[,item]")]
    MissingEquals {
        /// The rule.
        rule: String,
    },
    /// The method is neither `*` nor a name of letters, digits and `_`.
    #[error("rule {rule:?}: bad method name {method:?} (expected a variant name or *)")]
    BadMethod {
        /// The rule.
        rule: String,
        /// The method as written.
        method: String,
    },
    /// Two rules name the same method.
    #[error("method {method:?} has more than one rule")]
    DuplicateMethod {
        /// The method.
        method: String,
    },
    /// An item is not `req:X` or `rep:X`.
    #[error("rule {rule:?}: item {item:?} is not req:X or rep:X")]
    BadItem {
        /// The rule.
        rule: String,
        /// The item.
        item: String,
    },
    /// A rule gives `req` or `rep` twice.
    #[error("rule {rule:?}: {side} given more than once")]
    DuplicateItem {
        /// The rule.
        rule: String,
        /// `req` or `rep`.
        side: &'static str,
    },
    /// `X` is neither an integer >= 1 nor a fraction in (0, 1).
    #[error(
        "rule {rule:?}: item {item:?}: X must be an integer >= 1 (a count) \
         or a fraction in (0, 1) (a probability)"
    )]
    BadValue {
        /// The rule.
        rule: String,
        /// The item.
        item: String,
    },
    /// The seed is not a u64.
    #[error("{ENV_SEED}={0:?} is not a u64")]
    BadSeed(String),
}

/// When a rule's item fires.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Trigger {
    /// The first `n` exchanges of the method.
    First(u64),
    /// Each exchange with this probability.
    Probability(f64),
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::First(n) => write!(f, "{n}"),
            Trigger::Probability(p) => write!(f, "{p}"),
        }
    }
}

/// One `Method=item[,item]` rule.
#[derive(Clone, Debug, PartialEq)]
struct Rule {
    method: String,
    request: Option<Trigger>,
    reply: Option<Trigger>,
}

/// A parsed spec: which methods fail, how and when. See the module doc for
/// the format. `Display` writes it back in canonical form.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPlan {
    rules: Vec<Rule>,
}

impl FaultPlan {
    /// Parses a spec such as `RequestLease=req:1,rep:1;Heartbeat=rep:0.05`.
    pub fn parse(spec: &str) -> Result<Self, FaultSpecError> {
        let mut rules: Vec<Rule> = Vec::new();
        for rule in spec.split(';').map(str::trim).filter(|r| !r.is_empty()) {
            let Some((method, items)) = rule.split_once('=') else {
                return Err(FaultSpecError::MissingEquals { rule: rule.into() });
            };
            let method = method.trim();
            let named = !method.is_empty()
                && method
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if method != "*" && !named {
                return Err(FaultSpecError::BadMethod {
                    rule: rule.into(),
                    method: method.into(),
                });
            }
            if rules.iter().any(|r| r.method == method) {
                return Err(FaultSpecError::DuplicateMethod {
                    method: method.into(),
                });
            }
            let mut parsed = Rule {
                method: method.into(),
                request: None,
                reply: None,
            };
            for item in items.split(',').map(str::trim) {
                let bad_item = || FaultSpecError::BadItem {
                    rule: rule.into(),
                    item: item.into(),
                };
                let (side, value) = item.split_once(':').ok_or_else(bad_item)?;
                let (side, slot) = match side.trim() {
                    "req" => ("req", &mut parsed.request),
                    "rep" => ("rep", &mut parsed.reply),
                    _ => return Err(bad_item()),
                };
                if slot.is_some() {
                    return Err(FaultSpecError::DuplicateItem {
                        rule: rule.into(),
                        side,
                    });
                }
                let trigger =
                    parse_trigger(value.trim()).ok_or_else(|| FaultSpecError::BadValue {
                        rule: rule.into(),
                        item: item.into(),
                    })?;
                *slot = Some(trigger);
            }
            rules.push(parsed);
        }
        Ok(Self { rules })
    }

    /// Whether the plan has no rules (and so fails nothing).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule for `method`: its own, else the `*` rule.
    fn rule_for(&self, method: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.method == method)
            .or_else(|| self.rules.iter().find(|r| r.method == "*"))
    }
}

fn parse_trigger(value: &str) -> Option<Trigger> {
    if let Ok(n) = value.parse::<u64>() {
        return (n >= 1).then_some(Trigger::First(n));
    }
    let p: f64 = value.parse().ok()?;
    // NaN fails both comparisons.
    (p > 0.0 && p < 1.0).then_some(Trigger::Probability(p))
}

impl FromStr for FaultPlan {
    type Err = FaultSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        Self::parse(spec)
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{}=", rule.method)?;
            let items = [("req", rule.request), ("rep", rule.reply)];
            let mut first = true;
            for (side, trigger) in items {
                if let Some(trigger) = trigger {
                    if !first {
                        f.write_str(",")?;
                    }
                    first = false;
                    write!(f, "{side}:{trigger}")?;
                }
            }
        }
        Ok(())
    }
}

/// How one exchange is made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request is dropped before it is sent.
    Request,
    /// The request is sent and handled; its reply is discarded.
    Reply,
}

impl Fault {
    /// The message of the [`RpcError::Injected`](crate::RpcError::Injected)
    /// this fault makes for `method`.
    pub fn describe(self, method: &str) -> String {
        match self {
            Fault::Request => format!("{method} req: the request was dropped before it was sent"),
            Fault::Reply => {
                format!(
                    "{method} rep: the reply was discarded after the server handled the request"
                )
            }
        }
    }
}

/// A plan in force: the plan, the seeded generator and the per-method
/// counters. Shared by every client that captured it.
#[derive(Debug)]
pub struct Faults {
    plan: FaultPlan,
    seed: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// splitmix64's state.
    rng: u64,
    /// Per method: exchanges seen for `req` counts, then for `rep` counts.
    seen: HashMap<String, [u64; 2]>,
}

impl State {
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.rng)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn fires(&mut self, method: &str, side: usize, trigger: Trigger) -> bool {
        match trigger {
            Trigger::First(n) => {
                let counts = match self.seen.get_mut(method) {
                    Some(counts) => counts,
                    None => self.seen.entry(method.to_owned()).or_default(),
                };
                counts[side] = counts[side].saturating_add(1);
                counts[side] <= n
            }
            Trigger::Probability(p) => self.next_f64() < p,
        }
    }
}

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Faults {
    /// A plan in force, its probabilities drawn from `seed`.
    pub fn new(plan: FaultPlan, seed: u64) -> Self {
        Self {
            plan,
            seed,
            state: Mutex::new(State {
                rng: seed,
                seen: HashMap::new(),
            }),
        }
    }

    /// Parses `spec` (see [`FaultPlan::parse`]) and seeds it.
    pub fn from_spec(spec: &str, seed: u64) -> Result<Self, FaultSpecError> {
        Ok(Self::new(FaultPlan::parse(spec)?, seed))
    }

    /// The seed the probabilities are drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// Decides one exchange of `method`: `None` to let it go as normal.
    /// Counts it, and draws from the generator for probabilities. The
    /// `rep` item is judged only when the request is not dropped.
    pub fn decide(&self, method: &str) -> Option<Fault> {
        let rule = self.plan.rule_for(method)?;
        let mut state = self.state.locked();
        if let Some(trigger) = rule.request {
            if state.fires(method, 0, trigger) {
                return Some(Fault::Request);
            }
        }
        if let Some(trigger) = rule.reply {
            if state.fires(method, 1, trigger) {
                return Some(Fault::Reply);
            }
        }
        None
    }

    /// Decides one exchange of `request` (see [`Faults::decide`]): the fault
    /// and the message of its error.
    #[cold]
    pub(crate) fn decide_for<T: Serialize>(&self, request: &T) -> Option<(Fault, String)> {
        let method = method_name(request);
        let fault = self.decide(&method)?;
        info!(method = %method, ?fault, "injecting an RPC fault ({ENV_SPEC})");
        Some((fault, fault.describe(&method)))
    }
}

/// The variant name of a request enum (`RequestLease` for
/// `HeadRequest::RequestLease(..)`, `Status` for `HeadRequest::Status`), read
/// from its named MessagePack encoding: a map of one entry keyed by the
/// variant's name, or the bare name for a unit variant. [`UNKNOWN_METHOD`]
/// when it is neither.
pub fn method_name<T: Serialize>(request: &T) -> String {
    shoal_proto::codec::encode(request)
        .ok()
        .as_deref()
        .and_then(variant_name)
        .unwrap_or(UNKNOWN_METHOD)
        .to_owned()
}

/// The variant name at the start of an encoded, externally tagged enum.
fn variant_name(encoded: &[u8]) -> Option<&str> {
    let (&tag, rest) = encoded.split_first()?;
    match tag {
        // A map of exactly one entry: fixmap, map16, map32.
        0x81 => read_str(rest),
        0xde if rest.starts_with(&[0, 1]) => read_str(rest.get(2..)?),
        0xdf if rest.starts_with(&[0, 0, 0, 1]) => read_str(rest.get(4..)?),
        // A unit variant: its name alone.
        _ => read_str(encoded),
    }
}

/// A MessagePack string at the start of `bytes`.
fn read_str(bytes: &[u8]) -> Option<&str> {
    let (&tag, rest) = bytes.split_first()?;
    let (len, rest) = match tag {
        0xa0..=0xbf => (usize::from(tag & 0x1f), rest),
        0xd9 => (usize::from(*rest.first()?), rest.get(1..)?),
        0xda => (
            usize::from(u16::from_be_bytes(*rest.first_chunk::<2>()?)),
            rest.get(2..)?,
        ),
        0xdb => (
            usize::try_from(u32::from_be_bytes(*rest.first_chunk::<4>()?)).ok()?,
            rest.get(4..)?,
        ),
        _ => return None,
    };
    std::str::from_utf8(rest.get(..len)?).ok()
}

/// Builds the faults from the values of [`ENV_SPEC`] and [`ENV_SEED`]:
/// `Ok(None)` when there is no spec, or it has no rules; with no seed, one
/// from the clock and the process id.
pub fn from_settings(
    spec: Option<&str>,
    seed: Option<&str>,
) -> Result<Option<Faults>, FaultSpecError> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    let plan = FaultPlan::parse(spec)?;
    if plan.is_empty() {
        return Ok(None);
    }
    let seed = match seed.map(str::trim) {
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| FaultSpecError::BadSeed(s.into()))?,
        None => fresh_seed(),
    };
    Ok(Some(Faults::new(plan, seed)))
}

/// A seed from the clock and the process id.
fn fresh_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    mix(nanos ^ (u64::from(std::process::id()) << 32))
}

static GLOBAL: OnceLock<Option<Arc<Faults>>> = OnceLock::new();

/// The process's faults, read from the environment on the first call (see
/// the module doc); `None` when off. Clients capture it when they connect;
/// a daemon may call it at start to print the seed early.
pub fn global() -> Option<&'static Arc<Faults>> {
    GLOBAL.get_or_init(from_env).as_ref()
}

fn from_env() -> Option<Arc<Faults>> {
    let spec = match std::env::var(ENV_SPEC) {
        Ok(spec) => spec,
        Err(std::env::VarError::NotPresent) => return None,
        Err(std::env::VarError::NotUnicode(_)) => {
            refuse(&format!("{ENV_SPEC} is not valid UTF-8"));
            return None;
        }
    };
    let seed = std::env::var(ENV_SEED).ok();
    match from_settings(Some(&spec), seed.as_deref()) {
        Ok(None) => None,
        Ok(Some(faults)) => {
            let line = format!("shoal: {ENV_SPEC} active ({spec}), seed {}", faults.seed());
            eprintln!("{line}");
            warn!("{line}");
            Some(Arc::new(faults))
        }
        Err(e) => {
            refuse(&e.to_string());
            None
        }
    }
}

fn refuse(why: &str) {
    let line = format!("shoal: {ENV_SPEC} refused, running with NO injected faults: {why}");
    eprintln!("{line}");
    error!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    fn plan(spec: &str) -> FaultPlan {
        FaultPlan::parse(spec).expect("spec parses")
    }

    #[test]
    fn good_specs_parse_and_print_back() {
        let p = plan("RequestLease=req:1,rep:1;Heartbeat=rep:0.05");
        assert_eq!(p.to_string(), "RequestLease=req:1,rep:1;Heartbeat=rep:0.05");
        assert_eq!(
            p.rules,
            vec![
                Rule {
                    method: "RequestLease".into(),
                    request: Some(Trigger::First(1)),
                    reply: Some(Trigger::First(1)),
                },
                Rule {
                    method: "Heartbeat".into(),
                    request: None,
                    reply: Some(Trigger::Probability(0.05)),
                },
            ]
        );
        let spaced = plan(" *= rep:3 , req:0.5 ; ;Get_2=req:7;");
        assert_eq!(spaced.to_string(), "*=req:0.5,rep:3;Get_2=req:7");
        assert_eq!(plan(&spaced.to_string()), spaced);
        assert!(plan("").is_empty());
        assert!(plan(" ; ").is_empty());
    }

    #[test]
    fn bad_specs_name_the_bad_part() {
        let cases: &[(&str, FaultSpecError)] = &[
            (
                "Heartbeat",
                FaultSpecError::MissingEquals {
                    rule: "Heartbeat".into(),
                },
            ),
            (
                "Heart beat=req:1",
                FaultSpecError::BadMethod {
                    rule: "Heart beat=req:1".into(),
                    method: "Heart beat".into(),
                },
            ),
            (
                "=req:1",
                FaultSpecError::BadMethod {
                    rule: "=req:1".into(),
                    method: "".into(),
                },
            ),
            (
                "A=req:1;A=rep:1",
                FaultSpecError::DuplicateMethod { method: "A".into() },
            ),
            (
                "A=",
                FaultSpecError::BadItem {
                    rule: "A=".into(),
                    item: "".into(),
                },
            ),
            (
                "A=drop:1",
                FaultSpecError::BadItem {
                    rule: "A=drop:1".into(),
                    item: "drop:1".into(),
                },
            ),
            (
                "A=req:1,req:2",
                FaultSpecError::DuplicateItem {
                    rule: "A=req:1,req:2".into(),
                    side: "req",
                },
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(FaultPlan::parse(spec).as_ref(), Err(expected), "{spec}");
        }
        for value in [
            "0", "1.0", "1.5", "-1", "-0.5", "0.0", "NaN", "inf", "x", "",
        ] {
            let spec = format!("A=rep:{value}");
            assert_eq!(
                FaultPlan::parse(&spec),
                Err(FaultSpecError::BadValue {
                    rule: spec.clone(),
                    item: format!("rep:{value}"),
                }),
                "{spec}"
            );
        }
        let message = FaultPlan::parse("Ok=req:1;Bad=rep:2.5")
            .expect_err("bad")
            .to_string();
        assert!(message.contains("Bad=rep:2.5"), "{message}");
    }

    #[test]
    fn settings_are_off_without_a_spec_and_refused_with_a_bad_seed() {
        assert!(from_settings(None, Some("junk")).expect("off").is_none());
        assert!(from_settings(Some(""), None).expect("off").is_none());
        let faults = from_settings(Some("A=req:1"), Some(" 42 "))
            .expect("ok")
            .expect("on");
        assert_eq!(faults.seed(), 42);
        assert_eq!(faults.plan().to_string(), "A=req:1");
        assert!(from_settings(Some("A=req:1"), None).expect("ok").is_some());
        assert_eq!(
            from_settings(Some("A=req:1"), Some("-3")).err(),
            Some(FaultSpecError::BadSeed("-3".into()))
        );
        assert!(from_settings(Some("A=oops"), Some("1")).is_err());
    }

    #[test]
    fn counts_fail_the_first_exchanges_then_let_them_through() {
        let faults = Faults::from_spec("A=req:1;B=rep:2;C=req:1,rep:1", 1).expect("spec");
        assert_eq!(faults.decide("A"), Some(Fault::Request));
        assert_eq!(faults.decide("A"), None);
        assert_eq!(faults.decide("A"), None);
        assert_eq!(faults.decide("B"), Some(Fault::Reply));
        assert_eq!(faults.decide("B"), Some(Fault::Reply));
        assert_eq!(faults.decide("B"), None);
        // rep counts only the requests that were sent.
        assert_eq!(faults.decide("C"), Some(Fault::Request));
        assert_eq!(faults.decide("C"), Some(Fault::Reply));
        assert_eq!(faults.decide("C"), None);
        // Unlisted methods are untouched.
        assert_eq!(faults.decide("D"), None);
    }

    #[test]
    fn the_wildcard_counts_each_method_and_yields_to_its_own_rule() {
        let faults = Faults::from_spec("*=req:1;Special=rep:1", 1).expect("spec");
        assert_eq!(faults.decide("X"), Some(Fault::Request));
        assert_eq!(faults.decide("X"), None);
        assert_eq!(faults.decide("Y"), Some(Fault::Request));
        assert_eq!(faults.decide("Y"), None);
        assert_eq!(faults.decide("Special"), Some(Fault::Reply));
        assert_eq!(faults.decide("Special"), None);
        assert_eq!(faults.decide(UNKNOWN_METHOD), Some(Fault::Request));
    }

    #[test]
    fn probabilities_are_deterministic_for_a_seed() {
        let run = |seed| {
            let faults = Faults::from_spec("M=req:0.25,rep:0.5", seed).expect("spec");
            (0..2000).map(|_| faults.decide("M")).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same sequence");
        assert_ne!(a, run(8), "another seed, another sequence");
        let requests = a.iter().filter(|d| **d == Some(Fault::Request)).count();
        let replies = a.iter().filter(|d| **d == Some(Fault::Reply)).count();
        // Expected 500 and 750 (half of the 1500 sent).
        assert!((400..600).contains(&requests), "{requests}");
        assert!((650..850).contains(&replies), "{replies}");
    }

    #[test]
    fn method_names_come_from_the_variant() {
        #[derive(Serialize)]
        enum Request {
            Newtype(String),
            Tuple(u8, u8),
            Struct { a: u32, b: Vec<u8> },
            Unit,
        }
        assert_eq!(method_name(&Request::Newtype("x".into())), "Newtype");
        assert_eq!(method_name(&Request::Tuple(1, 2)), "Tuple");
        assert_eq!(
            method_name(&Request::Struct {
                a: 1,
                b: vec![0; 300]
            }),
            "Struct"
        );
        assert_eq!(method_name(&Request::Unit), "Unit");
        assert_eq!(method_name(&5u32), UNKNOWN_METHOD);
        assert_eq!(method_name(&vec![1u8, 2]), UNKNOWN_METHOD);
        let long = "L".repeat(300);
        let mut encoded = vec![0x81, 0xda, 0x01, 0x2c];
        encoded.extend_from_slice(long.as_bytes());
        encoded.push(0xc0);
        assert_eq!(variant_name(&encoded), Some(long.as_str()));
        assert_eq!(variant_name(&encoded[..10]), None, "truncated");
        assert_eq!(variant_name(&[]), None);
        assert_eq!(variant_name(&[0x82, 0xa1, b'a', 0, 0xa1, b'b', 0]), None);
    }

    #[test]
    fn faults_describe_the_method_and_side() {
        let req = Fault::Request.describe("RequestLease");
        assert!(req.starts_with("RequestLease req:"), "{req}");
        let rep = Fault::Reply.describe("Heartbeat");
        assert!(rep.starts_with("Heartbeat rep:"), "{rep}");
    }
}
