//! `kiln`, the command-line interface: the product surface for app developers and operators.
//!
//! This crate owns the command tree, the context file (which control plane, which token), the
//! local validation of `kiln.toml` before anything is sent, progress display, and the mapping of
//! failures to messages that say what to do next and to documented exit codes
//! ([`exit`]). It talks to the platform only through `kiln-api`'s client.

mod auth_cmd;
mod cmd;
mod config_cmd;
mod context;
mod domains_cmd;
pub mod exit;
mod ips_cmd;
mod ops_cmd;
mod secrets_cmd;
mod term;

use clap::Parser;

pub use cmd::Cli;

/// Runs the CLI with the process's arguments; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return code;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    match rt.block_on(cmd::run(cli)) {
        Ok(()) => exit::OK,
        Err(e) => {
            if e.message.is_empty() {
                return e.code;
            }
            eprintln!("error: {}", e.message);
            if let Some(hint) = &e.hint {
                eprintln!("hint: {hint}");
            }
            e.code
        }
    }
}
