//! Logging through `tracing`, filtered by `SHOAL_LOG` (or `RUST_LOG`).

use tracing_subscriber::EnvFilter;

/// Installs the subscriber; `default` applies when neither variable is set.
pub fn init(default: &str) {
    let filter = std::env::var("SHOAL_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .try_init();
}

/// Colours only on a terminal (a daemon's stderr is its log file) and
/// unless `NO_COLOR` is set: log files carry no escape codes.
pub fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}
