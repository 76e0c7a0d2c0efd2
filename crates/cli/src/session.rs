//! The session directory.
//!
//! ```text
//! ROOT/session_<UTC time>_<pid>/
//!     token, ca.key, ca.crt    cluster identity (head's machine only)
//!     head_address             where the head listens, host:port
//!     pids/head.pid            one file per daemon started from here
//!     pids/node-<pid>.pid
//!     logs/head.log            each daemon's log
//!     logs/node-<pid>.log
//! ROOT/session_latest -> session_<...>
//! ```

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// The link to the newest session under a root.
pub const LATEST: &str = "session_latest";

/// A session directory.
#[derive(Debug, Clone)]
pub struct Session {
    pub dir: PathBuf,
    /// Made by this command and not yet linked as the newest: a start that
    /// fails removes it, leaving the root as it was.
    unpublished: std::cell::Cell<bool>,
}

impl Session {
    fn at(dir: PathBuf) -> Self {
        Self {
            dir,
            unpublished: std::cell::Cell::new(false),
        }
    }

    /// Creates a new session directory under `root`; [`Session::publish`]
    /// points `root/session_latest` at it once what uses it has started.
    pub fn create(root: &Path) -> Result<Self> {
        ensure_private_root(root)?;
        let name = format!(
            "session_{}_{}",
            utc_stamp(SystemTime::now()),
            std::process::id()
        );
        let dir = root.join(&name);
        // A directory that already exists was not made by us: refuse it
        // rather than trust a token or key planted in it.
        private_dir()
            .create(&dir)
            .with_context(|| format!("creating session directory {}", dir.display()))?;
        let session = Self {
            dir,
            unpublished: std::cell::Cell::new(true),
        };
        for sub in ["pids", "logs"] {
            if let Err(e) = private_dir().create(session.dir.join(sub)) {
                session.discard();
                return Err(e).with_context(|| {
                    format!("creating session directory {}", session.dir.display())
                });
            }
        }
        Ok(session)
    }

    /// Points `root/session_latest` at a session this command created (once
    /// its daemon is up); nothing for any other session.
    pub fn publish(&self) -> Result<()> {
        if !self.unpublished.get() {
            return Ok(());
        }
        let (Some(root), Some(name)) = (self.dir.parent(), self.dir.file_name()) else {
            anyhow::bail!("{} is not inside a session root", self.dir.display());
        };
        let link = root.join(LATEST);
        let tmp = root.join(format!(".{LATEST}.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp)
            .and_then(|()| fs::rename(&tmp, &link))
            .with_context(|| format!("linking {}", link.display()))?;
        self.unpublished.set(false);
        Ok(())
    }

    /// Removes a session this command created and never published (its
    /// start failed); nothing for any other session.
    pub fn discard(&self) {
        if self.unpublished.replace(false) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    /// The session `root/session_latest` points to, if any (and if it is
    /// ours).
    pub fn latest(root: &Path) -> Option<Self> {
        let dir = fs::canonicalize(root.join(LATEST)).ok()?;
        let ours = fs::metadata(&dir)
            .is_ok_and(|m| m.is_dir() && m.uid() == nix::unistd::getuid().as_raw());
        ours.then(|| Self::at(dir))
    }

    /// An existing session directory, as given.
    pub fn open(dir: PathBuf) -> Result<Self> {
        for sub in ["pids", "logs"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("preparing session directory {}", dir.display()))?;
        }
        Ok(Self::at(dir))
    }

    pub fn token_path(&self) -> PathBuf {
        self.dir.join("token")
    }

    pub fn head_address_path(&self) -> PathBuf {
        self.dir.join("head_address")
    }

    /// Where the head's dashboard listens (`host:port`), once it does.
    pub fn dashboard_address_path(&self) -> PathBuf {
        self.dir.join("dashboard_address")
    }

    pub fn pid_path(&self, daemon: &str) -> PathBuf {
        self.dir.join("pids").join(format!("{daemon}.pid"))
    }

    pub fn log_path(&self, daemon: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{daemon}.log"))
    }

    /// The head's address recorded in this session.
    pub fn head_address(&self) -> Option<String> {
        fs::read_to_string(self.head_address_path())
            .ok()
            .map(|s| s.trim().to_string())
    }
}

fn private_dir() -> fs::DirBuilder {
    let mut builder = fs::DirBuilder::new();
    builder.mode(0o700);
    builder
}

/// Creates `root` (mode 0700) if needed, and checks that it is a real
/// directory owned by this user: session directories hold the join token.
fn ensure_private_root(root: &Path) -> Result<()> {
    if !root.exists() {
        private_dir()
            .recursive(true)
            .create(root)
            .with_context(|| format!("creating session root {}", root.display()))?;
    }
    let meta = fs::symlink_metadata(root)
        .with_context(|| format!("inspecting session root {}", root.display()))?;
    anyhow::ensure!(
        meta.is_dir() && !meta.file_type().is_symlink(),
        "session root {} is not a directory",
        root.display()
    );
    anyhow::ensure!(
        meta.uid() == nix::unistd::getuid().as_raw(),
        "session root {} belongs to another user; pass --session-dir with a directory of your own",
        root.display()
    );
    Ok(())
}

/// Every daemon's pid file under every session of `root` (`pids/*.pid`).
pub fn all_pid_files(root: &Path) -> Vec<PathBuf> {
    pid_files_in(root, "pids")
}

/// The pid files of submitted jobs' drivers under every session of `root`
/// (`jobs/<job>.pid`, named after the job).
pub fn all_driver_pid_files(root: &Path) -> Vec<PathBuf> {
    pid_files_in(root, "jobs")
}

/// The `*.pid` files in directory `sub` of every session of `root`.
fn pid_files_in(root: &Path, sub: &str) -> Vec<PathBuf> {
    let Ok(sessions) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for session in sessions.flatten() {
        let name = session.file_name();
        if name.to_string_lossy().starts_with("session_") && name != LATEST {
            if let Ok(pids) = fs::read_dir(session.path().join(sub)) {
                files.extend(
                    pids.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "pid")),
                );
            }
        }
    }
    files.sort();
    files
}

/// A pid file that removes itself when dropped.
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn write(path: PathBuf) -> Result<Self> {
        fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing pid file {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `YYYY-MM-DD_HH-MM-SS` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}_{:02}-{:02}-{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil conversion (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_utc_calendar_dates() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "1970-01-01_00-00-00");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_705_200); // 2026-11-26 15:00:00 UTC
        assert_eq!(utc_stamp(t), "2026-11-26_15-00-00");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(utc_stamp(leap), "2000-02-29_00-00-00");
    }

    #[test]
    fn session_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let session = Session::create(&root.path().join("nested")).expect("create");
        let mode = fs::metadata(&session.dir)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_symlinked_root_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let link = root.path().join("link");
        std::os::unix::fs::symlink(root.path(), &link).expect("symlink");
        assert!(Session::create(&link).is_err());
    }

    #[test]
    fn create_links_latest_and_finds_pid_files() {
        let root = tempfile::tempdir().expect("tempdir");
        let session = Session::create(root.path()).expect("create");
        assert!(Session::latest(root.path()).is_none(), "not before publish");
        session.publish().expect("publish");
        let latest = Session::latest(root.path()).expect("latest");
        assert_eq!(latest.dir, fs::canonicalize(&session.dir).expect("canon"));
        let pid = PidFile::write(session.pid_path("head")).expect("pid");
        assert_eq!(all_pid_files(root.path()), vec![session.pid_path("head")]);
        drop(pid);
        assert!(all_pid_files(root.path()).is_empty());
        latest.discard();
        assert!(
            session.dir.exists(),
            "a published session is never discarded"
        );
        // (Another root: one second, one pid, one session name.)
        let other = tempfile::tempdir().expect("tempdir");
        let failed = Session::create(other.path()).expect("create");
        failed.discard();
        assert!(!failed.dir.exists());
        assert!(Session::latest(other.path()).is_none());
    }
}
