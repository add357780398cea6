//! The `legate` binary: parse the command line, start logging, call the library, and
//! map the outcome to an exit code.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

use legate::cli::{self, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let (cli, quick) = match cli::parse() {
        Ok(parsed) => parsed,
        // Prints usage or help and exits 2 (0 for --help/--version).
        Err(error) => error.exit(),
    };
    match cli.command {
        Command::Version => {
            println!("legate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check(check) => match legate::config::Config::load(&check.config) {
            Ok(config) => {
                println!(
                    "{}: ok ({} listener{})",
                    check.config.display(),
                    config.listeners.len(),
                    if config.listeners.len() == 1 { "" } else { "s" }
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::FAILURE
            }
        },
        Command::Wait(wait) => {
            let code = legate::wait::wait(wait.admin, wait.timeout, wait.handover, &wait.command);
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Command::Run(run) => {
            if let Err(error) = legate::logging::init(run.log_format, &run.log_level) {
                eprintln!("legate: {error}");
                return ExitCode::from(2);
            }
            legate::metrics::install_panic_hook();
            let source = legate::lifecycle::Source {
                path: run.config.clone(),
                quick,
                admin: run.admin,
                handoff: run.handoff_socket.clone(),
            };
            let config = match source.load() {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("legate: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("legate")
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("legate: cannot start the runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let result =
                runtime.block_on(legate::lifecycle::run(config, source, run.command.clone()));
            // Connection tasks still parked after the drain must not hold the exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(error) => {
                    tracing::error!(%error, "legate could not start");
                    eprintln!("legate: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
