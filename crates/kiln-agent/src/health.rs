//! Health checks of an instance's services, as its WorkloadSpec lists them.
//!
//! - `tcp`: a connection to the service's internal port on the instance's address succeeds;
//! - `http`: `GET path` there answers 2xx (over TLS without verifying the certificate when the
//!   check says `tls`: the check runs on the private network and only asks "is it up");
//! - `exec`: the command, run inside the instance over the guest channel, exits 0.
//!
//! Each check runs on its own interval; while the instance has not been healthy yet, every check
//! runs at the fast startup pace so a deploy turns healthy as soon as it can.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use kiln_types::frame::{ExecStart, Frame};
use kiln_types::workload::{CheckKind, CheckSpec};
use kiln_types::WorkloadSpec;

use crate::guest::Guest;

struct Entry {
    port: u16,
    check: CheckSpec,
    last_run: Option<Instant>,
    failure: Option<String>,
}

/// The checks of one instance and their latest results.
pub(crate) struct Checks {
    entries: Vec<Entry>,
    http: reqwest::Client,
}

impl Checks {
    pub(crate) fn new(spec: &WorkloadSpec) -> Checks {
        let entries = spec
            .services
            .iter()
            .flat_map(|s| {
                s.checks.iter().map(move |c| Entry {
                    port: s.internal_port,
                    check: c.clone(),
                    last_run: None,
                    failure: None,
                })
            })
            .collect();
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Checks { entries, http }
    }

    /// Runs the checks that are due (all of them when `starting`) and returns the first failure,
    /// or `None` when every check passes.
    pub(crate) async fn evaluate(
        &mut self,
        spec: &WorkloadSpec,
        guest: &Arc<Guest>,
        starting: bool,
    ) -> Option<String> {
        let now = Instant::now();
        for e in &mut self.entries {
            let due = starting
                || e.last_run.is_none_or(|t| {
                    now.duration_since(t) >= Duration::from_millis(e.check.interval_ms)
                });
            if !due {
                continue;
            }
            e.last_run = Some(now);
            let addr = SocketAddr::new(spec.network.ipv6.into(), e.port);
            let timeout = Duration::from_millis(e.check.timeout_ms.max(1));
            e.failure = run(&e.check.kind, addr, timeout, guest, &self.http)
                .await
                .err();
        }
        self.entries.iter().find_map(|e| e.failure.clone())
    }

    /// Time until the next check is due.
    pub(crate) fn next_due(&self) -> Duration {
        let now = Instant::now();
        self.entries
            .iter()
            .map(|e| match e.last_run {
                Some(t) => {
                    Duration::from_millis(e.check.interval_ms).saturating_sub(now.duration_since(t))
                }
                None => Duration::ZERO,
            })
            .min()
            .unwrap_or(Duration::from_secs(10))
    }
}

async fn run(
    kind: &CheckKind,
    addr: SocketAddr,
    timeout: Duration,
    guest: &Arc<Guest>,
    http: &reqwest::Client,
) -> Result<(), String> {
    match kind {
        CheckKind::Tcp => match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("tcp check on port {}: {e}", addr.port())),
            Err(_) => Err(format!(
                "tcp check on port {}: timed out after {timeout:?}",
                addr.port()
            )),
        },
        CheckKind::Http { path, tls } => {
            let scheme = if *tls { "https" } else { "http" };
            let url = format!("{scheme}://{addr}{path}");
            match http.get(&url).timeout(timeout).send().await {
                Ok(resp) if resp.status().is_success() => Ok(()),
                Ok(resp) => Err(format!(
                    "http check GET {path} on port {}: status {}",
                    addr.port(),
                    resp.status().as_u16()
                )),
                Err(e) => Err(format!(
                    "http check GET {path} on port {}: {}",
                    addr.port(),
                    crate::error_chain(&e)
                )),
            }
        }
        CheckKind::Exec { command } => {
            let start = ExecStart {
                argv: command.clone(),
                env: vec![],
                tty: false,
                rows: 0,
                cols: 0,
            };
            let Some(mut session) = guest.exec(start, timeout).await else {
                return Err("exec check: the guest channel is not available".into());
            };
            let _ = session
                .send(Frame::StdinClose {
                    stream: session.stream,
                })
                .await;
            let result = tokio::time::timeout(timeout, async {
                while let Some(frame) = session.frames.recv().await {
                    if let Frame::Exit { status, .. } = frame {
                        return Some(status);
                    }
                }
                None
            })
            .await;
            match result {
                Ok(Some(s)) if s.as_code() == 0 => Ok(()),
                Ok(Some(s)) => Err(format!(
                    "exec check {:?} exited with {}",
                    command.join(" "),
                    s.as_code()
                )),
                Ok(None) => Err("exec check: the guest channel closed".into()),
                Err(_) => {
                    let _ = session
                        .send(Frame::Signal {
                            stream: session.stream,
                            signal: 9,
                        })
                        .await;
                    Err(format!(
                        "exec check {:?} timed out after {timeout:?}",
                        command.join(" ")
                    ))
                }
            }
        }
    }
}
