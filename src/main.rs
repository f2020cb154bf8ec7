//! ringvm's command line: parse → validate → run → report, printing the error chain on
//! failure.

use std::process::ExitCode;

use clap::Parser;
use ringvm::cli::{Cli, Command};

mod commands;

fn main() -> ExitCode {
    ringvm::vmm::vm::mark_process_start();
    // From here SIGINT/SIGTERM wait for a VM to read them, so every path out of ringvm
    // runs its clean-up (see vmm::signals::block).
    ringvm::vmm::signals::block();
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => commands::run(&args),
        Command::Bench(args) => commands::bench(&args),
        Command::Report(args) => commands::report(&args),
        Command::VhostUserBlk(args) => commands::vhost_user_blk(&args),
        Command::Ctl(args) => commands::ctl(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("ringvm: error: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}

/// "outer: cause: root cause", each source once.
fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn init_logging() {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= self.0
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!(
                    "ringvm: {}: {}",
                    r.level().as_str().to_lowercase(),
                    r.args()
                );
            }
        }
        fn flush(&self) {}
    }
    let level = match std::env::var("RINGVM_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Warn,
    };
    let logger: &'static Stderr = Box::leak(Box::new(Stderr(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
