//! `kiln-testkit`: the test harness's helpers for shell scripts (`./scripts/run`).
//!
//! - `kiln-testkit registry --dir DIR --listen 127.0.0.1:5000`: runs a local registry in the
//!   foreground until SIGTERM/SIGINT. Prints its `host:port` on stdout once it answers.
//! - `kiln-testkit push-example --registry 127.0.0.1:5000 --repo hello-tls --tag v1 [--greeting
//!   hello]`: builds hello-tls statically, packs it into an image, pushes it and prints
//!   `registry/repo@sha256:...` on stdout.
//!
//! Progress and diagnostics go to stderr, so stdout stays machine-readable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use kiln_testkit::{build_hello_tls, hello_tls_image, Registry};

#[derive(Parser)]
#[command(name = "kiln-testkit", about = "Kiln test harness helpers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a local OCI registry (Debian's docker-registry) until SIGTERM/SIGINT.
    Registry {
        /// Storage directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: SocketAddr,
    },
    /// Build examples/hello-tls statically, pack it into an image and push it.
    PushExample {
        /// Registry as host:port (plain HTTP).
        #[arg(long)]
        registry: String,
        #[arg(long, default_value = "hello-tls")]
        repo: String,
        #[arg(long, default_value = "v1")]
        tag: String,
        /// GREETING baked into the image's environment.
        #[arg(long, default_value = "hello")]
        greeting: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Registry { dir, listen } => registry(dir, listen).await,
        Cmd::PushExample {
            registry,
            repo,
            tag,
            greeting,
        } => push_example(&registry, &repo, &tag, &greeting).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-testkit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn registry(dir: PathBuf, listen: SocketAddr) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first, so a signal arriving during start-up still stops us cleanly.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut registry = Registry::start_at(&dir, listen).await?;
    eprintln!(
        "kiln-testkit: registry on http://{} (storage {})",
        registry.host(),
        dir.display()
    );
    println!("{}", registry.host());

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            // The registry dying on its own is an error the script should see.
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(status) = registry.try_wait()? {
                    bail!("registry exited unexpectedly: {status}; see {}",
                        registry.dir().join("kiln-testkit-registry.log").display());
                }
            }
        }
    }
    eprintln!("kiln-testkit: stopping registry");
    drop(registry); // kills and reaps the child
    Ok(())
}

async fn push_example(registry: &str, repo: &str, tag: &str, greeting: &str) -> Result<()> {
    eprintln!("kiln-testkit: building hello-tls (static)");
    let binary = tokio::task::spawn_blocking(build_hello_tls).await??;
    let image = hello_tls_image(&binary, greeting)?.build()?;
    eprintln!("kiln-testkit: pushing {registry}/{repo}:{tag}");
    let digest = image.push(registry, repo, tag).await?;
    println!("{registry}/{repo}@{digest}");
    Ok(())
}
