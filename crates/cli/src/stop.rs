//! `shoal stop`: stops every daemon started from this machine.
//!
//! Reads the pid files of every session under the root, sends SIGTERM (the
//! daemons leave the cluster and exit), waits up to a deadline, then sends
//! SIGKILL to what is left. A pid is signalled only while it still runs a
//! `shoal` executable, so a recycled pid is never hit.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::session::all_pid_files;
use crate::SessionArgs;

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// SIGKILL at once instead of stopping gracefully.
    #[arg(long)]
    force: bool,
    /// How long to wait for a graceful stop before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime_serde::re::humantime::parse_duration)]
    grace: Duration,
    #[command(flatten)]
    session: SessionArgs,
}

pub fn run(args: StopArgs) -> Result<()> {
    let daemons = running_daemons(&args.session.root);
    if daemons.is_empty() {
        println!(
            "No Shoal daemons running under {}",
            args.session.root.display()
        );
        return Ok(());
    }
    let first = if args.force {
        Signal::SIGKILL
    } else {
        Signal::SIGTERM
    };
    for &(pid, _) in &daemons {
        let _ = kill(Pid::from_raw(pid), first);
    }
    let mut left = wait_for_exit(&daemons, args.grace);
    if !left.is_empty() {
        eprintln!(
            "{} daemon(s) still running after {:?}; sending SIGKILL",
            left.len(),
            args.grace
        );
        for &(pid, _) in &left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        left = wait_for_exit(&left, Duration::from_secs(5));
    }
    for (pid, file) in &daemons {
        if !left.iter().any(|(p, _)| p == pid) {
            let _ = std::fs::remove_file(file);
        }
    }
    if !left.is_empty() {
        let pids: Vec<String> = left.iter().map(|(p, _)| p.to_string()).collect();
        anyhow::bail!("could not stop process(es) {}", pids.join(", "));
    }
    println!("Stopped {} Shoal daemon(s)", daemons.len());
    Ok(())
}

/// (pid, pid file) of every daemon under `root` that is still running.
fn running_daemons(root: &Path) -> Vec<(i32, std::path::PathBuf)> {
    let mut found = Vec::new();
    for file in all_pid_files(root) {
        let pid = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        match pid {
            Some(pid) if pid > 0 && is_shoal(pid) => found.push((pid, file)),
            // Stale: the daemon is gone (or the pid now belongs to another program).
            _ => {
                let _ = std::fs::remove_file(&file);
            }
        }
    }
    found
}

/// True while `pid` exists and has not exited (a zombie has exited).
fn is_running(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// True while `pid` runs a shoal executable.
fn is_shoal(pid: i32) -> bool {
    if !is_running(pid) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let exe = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let name = Path::new(std::str::from_utf8(exe).unwrap_or_default())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name == "shoal"
}

fn wait_for_exit(
    daemons: &[(i32, std::path::PathBuf)],
    grace: Duration,
) -> Vec<(i32, std::path::PathBuf)> {
    let deadline = Instant::now() + grace;
    loop {
        let left: Vec<_> = daemons
            .iter()
            .filter(|(pid, _)| is_running(*pid))
            .cloned()
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
