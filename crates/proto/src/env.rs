//! Worker environments: the variables a task or actor asks its worker
//! process to be started with (`.env_var("K", "V")`, and a job's default).

use serde::{Deserialize, Serialize};

/// Most variables one environment may set.
pub const ENV_VARS_MAX: usize = 64;
/// Longest variable name, in bytes.
pub const ENV_NAME_MAX: usize = 128;
/// Longest value, in bytes.
pub const ENV_VALUE_MAX: usize = 16 * 1024;

/// The variable a worker is told which of its variables are its
/// environment's (names joined by `,`), so that the tasks it submits
/// inherit them, as Ray's runtime environments are inherited.
pub const WORKER_ENV_NAMES: &str = "SHOAL_WORKER_ENV";

/// Environment variables set in a worker's process: sorted by name, each
/// name once. Workers started with different environments are never
/// shared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct EnvVars(Vec<(String, String)>);

impl EnvVars {
    /// No variables.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if it sets nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `name` to `value` (replacing an earlier value).
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        match self.0.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name, value)),
        }
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    /// `self`'s variables with `over`'s on top (a task's over its job's).
    pub fn merged(&self, over: &EnvVars) -> EnvVars {
        let mut out = self.clone();
        for (name, value) in &over.0 {
            out.set(name.clone(), value.clone());
        }
        out
    }

    /// The variables, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The names, joined by `,` (for [`WORKER_ENV_NAMES`]).
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
        names.join(",")
    }

    /// Refuses what a process environment cannot hold, or what a peer
    /// should not send: more than [`ENV_VARS_MAX`] variables, names that
    /// are not `[A-Za-z_][A-Za-z0-9_]*` or are longer than
    /// [`ENV_NAME_MAX`], names Shoal sets itself (`SHOAL_...`), values with
    /// a NUL byte or longer than [`ENV_VALUE_MAX`], and a list not sorted
    /// by unique names.
    pub fn check(&self) -> Result<(), String> {
        if self.0.len() > ENV_VARS_MAX {
            return Err(format!(
                "{} environment variables; at most {ENV_VARS_MAX}",
                self.0.len()
            ));
        }
        for (name, value) in &self.0 {
            check_name(name)?;
            if value.len() > ENV_VALUE_MAX {
                return Err(format!(
                    "the value of {name} is {} bytes; at most {ENV_VALUE_MAX}",
                    value.len()
                ));
            }
            if value.contains('\0') {
                return Err(format!("the value of {name} holds a NUL byte"));
            }
        }
        if self.0.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("environment variables not sorted by unique names".into());
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "environment variable name {name:?}: use letters, digits and '_', not starting with a digit"
        ));
    }
    if name.len() > ENV_NAME_MAX {
        return Err(format!(
            "environment variable name of {} bytes; at most {ENV_NAME_MAX}",
            name.len()
        ));
    }
    if name.starts_with("SHOAL_") {
        return Err(format!(
            "{name}: names starting with SHOAL_ are Shoal's own"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_values_replace_earlier_and_a_task_overrides_its_job() {
        let mut job = EnvVars::new();
        job.set("B", "job");
        job.set("A", "job");
        job.set("B", "job2");
        assert_eq!(job.names(), "A,B");
        let mut task = EnvVars::new();
        task.set("B", "task");
        task.set("C", "task");
        let env = job.merged(&task);
        assert_eq!(env.get("A"), Some("job"));
        assert_eq!(env.get("B"), Some("task"));
        assert_eq!(env.get("C"), Some("task"));
        assert!(env.check().is_ok());
    }

    #[test]
    fn what_a_process_environment_cannot_hold_is_refused() {
        for (name, value) in [
            ("", "v"),
            ("1A", "v"),
            ("A=B", "v"),
            ("A B", "v"),
            ("SHOAL_TOKEN", "v"),
            ("A", "nul\0"),
        ] {
            let mut env = EnvVars::new();
            env.set(name, value);
            assert!(env.check().is_err(), "{name:?}={value:?}");
        }
        let mut long = EnvVars::new();
        long.set("A", "v".repeat(ENV_VALUE_MAX + 1));
        assert!(long.check().expect_err("too long").contains("bytes"));
        let mut many = EnvVars::new();
        for i in 0..=ENV_VARS_MAX {
            many.set(format!("V{i}"), "1");
        }
        assert!(many.check().expect_err("too many").contains("at most"));
        // As a peer might send it: unsorted, or a name twice.
        let unsorted = EnvVars(vec![("B".into(), "1".into()), ("A".into(), "1".into())]);
        assert!(unsorted.check().is_err());
        let twice = EnvVars(vec![("A".into(), "1".into()), ("A".into(), "2".into())]);
        assert!(twice.check().is_err());
    }
}
