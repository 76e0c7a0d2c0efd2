//! Headless Chromium for the dashboard's tests (Debian's `chromium`;
//! `.ci/run` installs it): load a page as a user's browser would, with its
//! scripts, and read back the DOM they built or a screenshot.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs headless Chromium on `url` with `extra` flags (`--dump-dom`,
/// `--screenshot=FILE`), in a profile of its own; its output. Killed with
/// every process it started if it takes longer than `timeout`.
pub fn chromium(url: &str, extra: &[String], timeout: Duration) -> Output {
    let profile = tempfile::tempdir().expect("tempdir");
    let child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1300,1400",
            // Scripts run on, their fetches answered, before the page is read.
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("these tests need chromium (apt-get install chromium)");
    let pid = child.id();
    // Read its output as it comes (a large DOM would fill the pipe), and
    // wait at most `timeout` for it to end.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(timeout).ok().and_then(Result::ok);
    // Its whole group goes: the browser on a timeout, and any helper left.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    drop(profile);
    out.unwrap_or_else(|| panic!("chromium did not finish within {timeout:?} on {url}"))
}

/// The page at `url` as headless Chromium renders it (`--dump-dom`).
pub fn dump_dom(url: &str, timeout: Duration) -> String {
    let out = chromium(url, &["--dump-dom".to_string()], timeout);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A screenshot of `url` into `file`; true if one was written.
pub fn screenshot(url: &str, file: &Path, timeout: Duration) -> bool {
    let _ = std::fs::remove_file(file);
    chromium(url, &[format!("--screenshot={}", file.display())], timeout);
    std::fs::metadata(file).is_ok_and(|m| m.len() > 0)
}
