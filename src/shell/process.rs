//! What every Tandem binary does the same way at start and exit: parse arguments with
//! the usage exit code, log to stderr, tell systemd it is ready or stopping, and turn a
//! failure into one line and exit code 1.

use std::process::ExitCode;

/// Parse the command line; `--help` and `--version` exit 0, bad arguments exit 2.
pub fn parse_args<C: clap::Parser>() -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        let code = if e.use_stderr() { 2 } else { 0 };
        let _ = e.print();
        ExitCode::from(code)
    })
}

/// Log to stderr, filtered by `TANDEM_LOG` (default `info`), coloured only on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Exit 0, or print the failure (with its causes) as one line and exit 1. With `log`,
/// the failure also goes to the log, for daemons whose stderr is not watched.
pub fn finish<E: std::fmt::Display>(prog: &str, r: Result<(), E>, log: bool) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if log {
                tracing::error!("{e:#}");
            }
            eprintln!("{prog}: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Tell systemd (Type=notify) how we are doing; a no-op without NOTIFY_SOCKET.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(s) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let p = std::path::PathBuf::from(path);
    let r = if let Some(abs) = p.to_str().and_then(|s| s.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())
            .and_then(|a| s.send_to_addr(state.as_bytes(), &a))
    } else {
        s.send_to(state.as_bytes(), &p)
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "sd_notify");
    }
}
