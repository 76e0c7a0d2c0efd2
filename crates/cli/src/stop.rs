//! `shoal stop`: stops every daemon started from this machine.
//!
//! Reads the pid files of every session under the root, sends SIGTERM (the
//! daemons leave the cluster and exit), waits up to a deadline, then sends
//! SIGKILL to what is left. A process is identified by its pid and its start
//! time, checked before every signal, so a recycled pid is never hit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::session::all_pid_files;
use crate::SessionArgs;

/// Longest grace period honoured.
const GRACE_MAX: Duration = Duration::from_secs(3600);

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// SIGKILL at once instead of stopping gracefully.
    #[arg(long)]
    force: bool,
    /// How long to wait for a graceful stop before SIGKILL (at most 1h).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime_serde::re::humantime::parse_duration)]
    grace: Duration,
    #[command(flatten)]
    session: SessionArgs,
}

/// A daemon found through its pid file.
#[derive(Clone, Debug)]
struct Daemon {
    pid: i32,
    /// Start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
    started: u64,
    pid_file: PathBuf,
    /// A submitted job's driver: its whole process group is signalled.
    group: bool,
}

impl Daemon {
    /// True while the same process (pid and start time) has not exited.
    fn running(&self) -> bool {
        process_state(self.pid)
            .is_some_and(|(state, started)| started == self.started && !exited(state))
    }

    fn signal(&self, signal: Signal) {
        if !self.running() {
            return;
        }
        let pid = Pid::from_raw(self.pid);
        let _ = if self.group {
            nix::sys::signal::killpg(pid, signal)
        } else {
            kill(pid, signal)
        };
    }
}

pub fn run(args: StopArgs) -> Result<()> {
    let daemons = running_daemons(&args.session.root);
    let drivers = running_drivers(&args.session.root);
    if daemons.is_empty() && drivers.is_empty() {
        println!(
            "No Shoal daemons running under {}",
            args.session.root.display()
        );
        return Ok(());
    }
    let grace = args.grace.min(GRACE_MAX);
    let first = if args.force {
        Signal::SIGKILL
    } else {
        Signal::SIGTERM
    };
    let mut left = stop_all(&daemons, first, grace);
    // The drivers of submitted jobs stop with their head; these are those
    // whose head was killed first.
    let drivers: Vec<Daemon> = drivers.into_iter().filter(Daemon::running).collect();
    left.extend(stop_all(&drivers, first, grace));
    // What the drivers started in their groups, even once the drivers are
    // gone (a group's id is not reused while a member lives).
    for driver in &drivers {
        let _ = nix::sys::signal::killpg(Pid::from_raw(driver.pid), Signal::SIGKILL);
    }
    for daemon in daemons.iter().chain(&drivers) {
        if !daemon.running() {
            let _ = std::fs::remove_file(&daemon.pid_file);
        }
    }
    for daemon in &daemons {
        if !daemon.running() {
            // A daemon killed before it could clean up leaves its object
            // store (shared memory, spill files) behind.
            if let Some(session) = daemon.pid_file.parent().and_then(Path::parent) {
                shoal_node::object_store::remove_orphans(&session.join("spill"));
                shoal_node::object_store::remove_orphans(&shoal_node::object_store::default_root(
                    session,
                ));
            }
        }
    }
    if !left.is_empty() {
        let pids: Vec<String> = left.iter().map(|d| d.pid.to_string()).collect();
        anyhow::bail!("could not stop process(es) {}", pids.join(", "));
    }
    println!("Stopped {} Shoal daemon(s)", daemons.len());
    if !drivers.is_empty() {
        println!(
            "Stopped {} job driver(s) left by a killed head",
            drivers.len()
        );
    }
    Ok(())
}

/// Signals each, then SIGKILL to those still running after `grace`; the
/// ones that would not stop.
fn stop_all(daemons: &[Daemon], first: Signal, grace: Duration) -> Vec<Daemon> {
    for daemon in daemons {
        daemon.signal(first);
    }
    let mut left = wait_for_exit(daemons, grace);
    if !left.is_empty() {
        eprintln!(
            "{} process(es) still running after {grace:?}; sending SIGKILL",
            left.len()
        );
        for daemon in &left {
            daemon.signal(Signal::SIGKILL);
        }
        left = wait_for_exit(&left, Duration::from_secs(5));
    }
    left
}

/// The drivers of submitted jobs under `root` still running, from the pid
/// files their heads wrote (`jobs/<job>.pid`): a process counts only if it
/// leads its process group and was started with that job's id.
fn running_drivers(root: &Path) -> Vec<Daemon> {
    let files = crate::session::all_driver_pid_files(root);
    running(files, true, |pid, pid_file| {
        let Some(job) = pid_file.file_stem() else {
            return false;
        };
        let leads = nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok() == Some(Pid::from_raw(pid));
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let marker = format!("SHOAL_JOB_ID={}", job.to_string_lossy());
        leads && environ.split(|b| *b == 0).any(|v| v == marker.as_bytes())
    })
}

/// Every daemon under `root` that is still running.
fn running_daemons(root: &Path) -> Vec<Daemon> {
    running(all_pid_files(root), false, |pid, _| is_shoal(pid))
}

/// The processes of `pid_files` still running that `ours` accepts (by pid
/// and pid file); the other files are stale (the process is gone, or the
/// pid now belongs to another program) and removed.
fn running(pid_files: Vec<PathBuf>, group: bool, ours: impl Fn(i32, &Path) -> bool) -> Vec<Daemon> {
    let mut found = Vec::new();
    for pid_file in pid_files {
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let daemon = pid.filter(|p| *p > 0).and_then(|pid| {
            let (state, started) = process_state(pid)?;
            (!exited(state) && ours(pid, &pid_file)).then_some(Daemon {
                pid,
                started,
                pid_file: pid_file.clone(),
                group,
            })
        });
        match daemon {
            Some(daemon) => found.push(daemon),
            None => {
                let _ = std::fs::remove_file(&pid_file);
            }
        }
    }
    found
}

fn exited(state: char) -> bool {
    matches!(state, 'Z' | 'X')
}

/// The state letter and start time of `pid`, from `/proc/<pid>/stat`.
fn process_state(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is parenthesised and may hold spaces: split after it.
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 overall is the 20th after the name (fields 3.. start at 0 here).
    let started = fields.get(19)?.parse().ok()?;
    Some((state, started))
}

/// True while `pid` runs a shoal executable.
fn is_shoal(pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let exe = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    Path::new(std::str::from_utf8(exe).unwrap_or_default())
        .file_name()
        .is_some_and(|n| n == "shoal")
}

fn wait_for_exit(daemons: &[Daemon], grace: Duration) -> Vec<Daemon> {
    let deadline = Instant::now() + grace;
    loop {
        let left: Vec<Daemon> = daemons.iter().filter(|d| d.running()).cloned().collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_start_time() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let (state, started) = process_state(me).expect("own stat");
        assert!(!exited(state));
        assert!(started > 0);
        let daemon = Daemon {
            pid: me,
            started,
            pid_file: PathBuf::new(),
            group: false,
        };
        assert!(daemon.running());
        let recycled = Daemon {
            started: started + 1,
            ..daemon
        };
        assert!(!recycled.running(), "another start time is another process");
    }
}
