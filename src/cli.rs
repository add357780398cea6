//! The command line: `run`, `check`, `wait`, `version`. Every flag has an environment
//! variable (`LEGATE_*`) for `docker run -e`.
//!
//! Quick mode pairs flags by position: each `--upstream` belongs to the nearest
//! `--listen` before it, so `--listen A --upstream X --upstream Y --listen B --upstream Z`
//! makes two listeners. From the environment (`LEGATE_LISTEN`, `LEGATE_UPSTREAM`, both
//! comma-separated) there is no order to go by, so exactly one listen address is allowed.

use crate::config::duration::parse_duration;
use crate::config::{ListenerConfig, Target};
use crate::logging::LogFormat;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "legate",
    version,
    about = "An ambassador sidecar: a zero-copy L4 proxy that finds, checks and follows your backends",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (from a config file, from --listen/--upstream pairs, or both).
    Run(RunArgs),
    /// Validate a configuration file: exit 0, or 1 with FILE:LINE:COL and what is wrong.
    Check(CheckArgs),
    /// Block until legate's /ready is 200, then exit 0 or exec CMD; exit 1 on timeout.
    Wait(WaitArgs),
    /// Print the version.
    Version,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(
        short = 'c',
        long = "config",
        env = "LEGATE_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Address to accept clients on; the --upstream flags after it belong to it.
    #[arg(
        long,
        env = "LEGATE_LISTEN",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub(crate) listen: Vec<SocketAddr>,
    /// Upstream target: IP:PORT, HOST:PORT, dns:HOST:PORT, srv:NAME or file:PATH.
    #[arg(
        long,
        env = "LEGATE_UPSTREAM",
        value_name = "TARGET",
        value_delimiter = ','
    )]
    pub(crate) upstream: Vec<Target>,
    /// Admin address (readiness, metrics); overrides [admin] listen. Default 127.0.0.1:9901.
    #[arg(long, env = "LEGATE_ADMIN", value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Where a new legate takes this one's sockets over: @NAME (abstract), a path, or
    /// "off"; overrides [runtime] handoff_socket. Default @legate-handoff:<admin address>.
    #[arg(long, env = "LEGATE_HANDOFF_SOCKET", value_name = "SOCKET", value_parser = crate::config::Handoff::parse)]
    pub handoff_socket: Option<crate::config::Handoff>,
    /// Log format.
    #[arg(long, env = "LEGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level (error, warn, info, debug, trace) or a filter such as "legate=debug".
    #[arg(
        long,
        env = "LEGATE_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
    /// Supervise mode: once ready, run CMD, pass signals on to it, and when it exits drain
    /// and exit with its exit code.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Configuration file to validate.
    #[arg(
        short = 'c',
        long = "config",
        env = "LEGATE_CONFIG",
        value_name = "FILE"
    )]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// legate's admin address.
    #[arg(
        long,
        env = "LEGATE_ADMIN",
        value_name = "ADDR",
        default_value = "127.0.0.1:9901"
    )]
    pub admin: SocketAddr,
    /// Give up after this long (250ms, 2s, 5m).
    #[arg(long, env = "LEGATE_WAIT_TIMEOUT", value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// SidecarSet hot upgrade (a PostStart hook): wait until the legate of this container
    /// (the one whose SIDECARSET_VERSION is ours) answers /ready; exit 0 at once in the
    /// empty container (SIDECARSET_VERSION=0).
    #[arg(long)]
    pub handover: bool,
    /// Command to exec once ready (its exit status becomes ours).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Parse the command line; quick-mode pairs come back already grouped.
pub fn parse() -> Result<(Cli, Vec<ListenerConfig>), clap::Error> {
    parse_from(std::env::args_os())
}

fn parse_from<I, T>(args: I) -> Result<(Cli, Vec<ListenerConfig>), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let quick = match (&cli.command, matches.subcommand_matches("run")) {
        (Command::Run(run), Some(run_matches)) => pair(run, run_matches)
            .map_err(|message| command.error(clap::error::ErrorKind::ArgumentConflict, message))?,
        _ => Vec::new(),
    };
    Ok((cli, quick))
}

fn pair(run: &RunArgs, matches: &clap::ArgMatches) -> Result<Vec<ListenerConfig>, String> {
    if run.listen.is_empty() {
        if !run.upstream.is_empty() {
            return Err("--upstream needs a --listen address before it".into());
        }
        return Ok(Vec::new());
    }
    let from_env = |id: &str| matches.value_source(id) == Some(ValueSource::EnvVariable);
    let mut groups: Vec<(SocketAddr, Vec<Target>)> =
        run.listen.iter().map(|addr| (*addr, Vec::new())).collect();
    if from_env("listen") || from_env("upstream") || run.listen.len() == 1 {
        if run.listen.len() != 1 {
            return Err(
                "LEGATE_LISTEN may hold one address; use a config file for more listeners".into(),
            );
        }
        groups[0].1 = run.upstream.clone();
    } else {
        let listens: Vec<usize> = matches
            .indices_of("listen")
            .map(Iterator::collect)
            .unwrap_or_default();
        let upstreams: Vec<usize> = matches
            .indices_of("upstream")
            .map(Iterator::collect)
            .unwrap_or_default();
        for (target, index) in run.upstream.iter().zip(upstreams) {
            let Some(owner) = listens.iter().rposition(|&listen| listen < index) else {
                return Err(format!("--upstream {target} comes before any --listen"));
            };
            groups[owner].1.push(target.clone());
        }
    }
    let listeners = groups
        .into_iter()
        .map(|(listen, upstream)| {
            // Quick-mode listeners are named by their address: it is what the user typed.
            ListenerConfig::with_defaults(listen.to_string(), listen, upstream)
        })
        .collect();
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(args: &[&str]) -> Result<Vec<ListenerConfig>, String> {
        let mut all = vec!["legate", "run"];
        all.extend_from_slice(args);
        parse_from(all)
            .map(|(_, quick)| quick)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn upstreams_belong_to_the_listen_before_them() {
        let listeners = quick(&[
            "--listen",
            "127.0.0.1:1",
            "--upstream",
            "127.0.0.1:10",
            "--upstream",
            "127.0.0.1:11",
            "--listen",
            "127.0.0.1:2",
            "--upstream",
            "127.0.0.1:20",
        ])
        .unwrap();
        assert_eq!(listeners.len(), 2);
        assert_eq!(listeners[0].upstream.len(), 2);
        assert_eq!(listeners[1].upstream, vec!["127.0.0.1:20".parse().unwrap()]);
        assert_eq!(listeners[0].name, "127.0.0.1:1");
    }

    #[test]
    fn upstream_before_listen_is_an_error() {
        let error = quick(&[
            "--upstream",
            "127.0.0.1:10",
            "--listen",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:2",
        ])
        .unwrap_err();
        assert!(error.contains("comes before any --listen"), "{error}");
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        assert!(parse_from(["legate", "run", "--listen", "nonsense"]).is_err());
        assert!(parse_from(["legate", "run", "--bogus"]).is_err());
        assert!(parse_from(["legate", "wait", "--timeout", "5"]).is_err());
        assert!(parse_from(["legate", "frobnicate"]).is_err());
    }

    #[test]
    fn wait_takes_a_command() {
        let (cli, _) =
            parse_from(["legate", "wait", "--timeout", "2s", "--", "echo", "hi"]).unwrap();
        let Command::Wait(wait) = cli.command else {
            panic!("not wait")
        };
        assert_eq!(wait.timeout, Duration::from_secs(2));
        assert_eq!(wait.command, vec!["echo", "hi"]);
    }
}
