//! `kiln-init`: PID 1 inside every Kiln instance.
//!
//! It owns the instance's process lifecycle: read the run configuration the agent placed at
//! `/.kiln/run.json`, start the app with its argv, env, working directory and user, reap every
//! zombie (as PID 1 must), forward signals to the app, stop it gracefully (stop signal, timeout,
//! then SIGKILL), and record how it ended in `/.kiln/exit.json` before exiting with the app's
//! status. It also serves the guest channel ([`channel`]): the app's output as timestamped log
//! records, and commands run by `kiln exec` ([`exec`]). It depends only on `kiln-types` and libc
//! so that it builds as a small static binary.
//!
//! Signal handling walk-through:
//! 1. all signals are blocked before any thread or child exists, so every thread inherits the
//!    mask and only the main loop receives signals; children unblock them before exec;
//! 2. the main thread waits with `sigtimedwait`, so signals arrive as values in one loop, with no
//!    async handlers and no races with `waitpid`;
//! 3. SIGCHLD → reap everything, routing exec children's statuses to their sessions; termination
//!    signals → forward the configured stop signal and arm the stop deadline; other signals are
//!    forwarded as they are.
#![allow(unsafe_code)]

mod channel;
mod exec;
mod layer;
mod mounts;
mod net;
mod secrets;
mod vm;
mod vsock;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_types::frame::{ExitStatus, Frame, Output};
use kiln_types::guest::{RunConfig, CHANNEL_SOCKET, RUN_CONFIG_PATH};

const EXIT_PATH: &str = "/.kiln/exit.json";
/// How long init waits for the agent's secrets frame before giving up on starting the app.
const SECRETS_WAIT: Duration = Duration::from_secs(60);

pub(crate) fn log(msg: &str) {
    eprintln!("kiln-init: {msg}");
}

pub(crate) fn signal_number(name: &str) -> libc::c_int {
    match name {
        "SIGINT" => libc::SIGINT,
        "SIGQUIT" => libc::SIGQUIT,
        "SIGHUP" => libc::SIGHUP,
        "SIGUSR1" => libc::SIGUSR1,
        "SIGUSR2" => libc::SIGUSR2,
        "SIGKILL" => libc::SIGKILL,
        _ => libc::SIGTERM,
    }
}

fn full_sigset() -> libc::sigset_t {
    // SAFETY: sigfillset initialises the set it is given; zeroed memory is a valid starting value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        set
    }
}

/// Restores the default signal mask in a child between fork and exec, and makes it a session
/// leader so a signal can reach its whole process group.
pub(crate) fn child_setup(cmd: &mut Command) {
    // SAFETY: between fork and exec only async-signal-safe calls are made (sigprocmask, setsid).
    unsafe {
        cmd.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::setsid();
            Ok(())
        });
    }
}

fn write_exit(status: ExitStatus) {
    let body = format!(
        "{{\"code\":{},\"signal\":{}}}",
        status.code.map_or("null".into(), |c| c.to_string()),
        status.signal.map_or("null".into(), |s| s.to_string())
    );
    // A read-only root has no room for it: the run directory (shared with the host) does.
    if std::fs::write(EXIT_PATH, &body).is_err() {
        let _ = std::fs::write(format!("{}/exit.json", kiln_types::guest::RUN_DIR), body);
    }
}

fn main() {
    if vm::is_vm() {
        let (config, disk) = match vm::boot() {
            Ok(c) => c,
            Err(e) => {
                log(&format!("cannot boot: {e}"));
                // Without a config disk there is nowhere to record the status either.
                vm::shutdown(Path::new("/dev/null"), Some(127), None);
            }
        };
        let status = run(config, Transport::VmPort);
        let (code, signal) = (status.code, status.signal);
        vm::shutdown(&disk, code, signal);
    }
    let config: RunConfig = match std::fs::read(RUN_CONFIG_PATH)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            log(&format!("cannot read {RUN_CONFIG_PATH}: {e}"));
            write_exit(ExitStatus {
                code: Some(127),
                signal: None,
            });
            std::process::exit(127);
        }
    };
    let status = run(config, Transport::UnixSocket);
    write_exit(status);
    std::process::exit(status.as_code());
}

/// How the guest channel reaches the agent.
enum Transport {
    /// runc: a Unix socket in the directory the runtime shares with the host.
    UnixSocket,
    /// A VM: the virtio-serial port named `kiln.channel`.
    VmPort,
}

/// Copies one of the app's outputs to init's own (the runtime's log) and to the channel.
fn pump_logs(mut from: impl Read, output: Output, shared: Arc<channel::Shared>) {
    let mut buf = vec![0u8; kiln_types::frame::MAX_CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let _ = match output {
            Output::Stdout => std::io::Write::write_all(&mut std::io::stdout(), chunk),
            Output::Stderr => std::io::Write::write_all(&mut std::io::stderr(), chunk),
        };
        shared.log(Frame::Log {
            output,
            ts_ms: kiln_types::now_millis(),
            bytes: chunk.to_vec(),
        });
    }
}

/// Runs the app to its end; returns how it ended.
fn run(config: RunConfig, transport: Transport) -> ExitStatus {
    let all = full_sigset();
    // SAFETY: blocking signals in the only thread that exists yet; the set is initialised.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut()) };

    if let Some(net) = &config.network {
        if let Err(e) = net::configure(net) {
            // Without its network the app cannot serve; fail visibly instead of running cut off.
            log(&format!("cannot configure the network: {e}"));
            return ExitStatus {
                code: Some(126),
                signal: None,
            };
        }
    }
    if let Err(e) = mounts::prepare(&config, matches!(transport, Transport::VmPort)) {
        // Without its volumes the app would write where nothing is kept: do not start it.
        log(&format!("cannot prepare the volumes: {e}"));
        return ExitStatus {
            code: Some(126),
            signal: None,
        };
    }
    // CAP_NET_ADMIN was granted for the step above only: take it out of the bounding set, so
    // neither the app nor exec sessions (root or not) can get it back.
    // SAFETY: plain prctl(2); failure leaves the set as the runtime gave it.
    if unsafe {
        libc::prctl(libc::PR_CAPBSET_DROP, 12 /* CAP_NET_ADMIN */, 0, 0, 0)
    } != 0
    {
        log("cannot drop CAP_NET_ADMIN from the bounding set");
    }
    let config = Arc::new(config);
    let shared = channel::Shared::new(config.clone());
    let served = match transport {
        Transport::UnixSocket => channel::listen(CHANNEL_SOCKET, shared.clone())
            .map_err(|e| format!("{CHANNEL_SOCKET}: {e}")),
        Transport::VmPort => match vm::channel_port() {
            Ok(path) => vm::Port::open(&path)
                .map(|port| channel::serve_port(port, shared.clone()))
                .map_err(|e| format!("{}: {e}", path.display())),
            // No virtio-serial port: a vsock device (Firecracker's hybrid vsock).
            Err(serial) => vsock::listen(vsock::VSOCK_CHANNEL_PORT, shared.clone())
                .map_err(|e| format!("{serial}; vsock port {}: {e}", vsock::VSOCK_CHANNEL_PORT)),
        },
    };
    if let Err(e) = served {
        // The app still runs without a channel; exec and log shipping are unavailable.
        log(&format!("cannot serve the guest channel: {e}"));
    }

    // The secrets file comes before the app: an instance never starts without the version its
    // release names.
    let mut secret_env = std::collections::BTreeMap::new();
    let mut installed = 0;
    if let Some(s) = &config.secrets {
        let Some((version, bytes)) = shared.wait_for_secrets(SECRETS_WAIT) else {
            log(&format!(
                "the agent did not deliver secrets version {} within {}s",
                s.version,
                SECRETS_WAIT.as_secs()
            ));
            return ExitStatus {
                code: Some(126),
                signal: None,
            };
        };
        match secrets::install(&bytes, config.uid, config.gid) {
            Ok(file) => {
                installed = version;
                if s.export_env {
                    secret_env = file.secrets;
                }
            }
            Err(e) => {
                log(&format!("cannot install secrets version {version}: {e}"));
                return ExitStatus {
                    code: Some(126),
                    signal: None,
                };
            }
        }
    }

    let Some((program, args)) = config.argv.split_first() else {
        log("run configuration has an empty argv");
        return ExitStatus {
            code: Some(127),
            signal: None,
        };
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&config.env)
        .envs(&secret_env)
        .current_dir(&config.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if config.uid != 0 || config.gid != 0 {
        // std drops root's supplementary groups when it switches uid.
        cmd.uid(config.uid).gid(config.gid);
    }
    child_setup(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            log(&format!("cannot start {program:?}: {e}"));
            return ExitStatus {
                code: Some(127),
                signal: None,
            };
        }
    };
    let pid = child.id() as libc::pid_t;
    drop(secret_env);
    shared.app_started(pid, installed);
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        let s = shared.clone();
        pumps.push(std::thread::spawn(move || {
            pump_logs(out, Output::Stdout, s)
        }));
    }
    if let Some(err) = child.stderr.take() {
        let s = shared.clone();
        pumps.push(std::thread::spawn(move || {
            pump_logs(err, Output::Stderr, s)
        }));
    }
    // std's Child would reap on wait; we reap everything ourselves with waitpid(-1).
    std::mem::forget(child);

    let stop_signal = signal_number(&config.stop_signal);
    let mut deadline: Option<Instant> = None;
    loop {
        let timeout = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the set and timespec are valid; info may be null.
        let sig = unsafe { libc::sigtimedwait(&all, std::ptr::null_mut(), &ts) };
        if sig < 0 {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                log("app did not stop in time; sending SIGKILL");
                // SAFETY: plain syscall on the app's process group.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                deadline = None;
            }
            continue;
        }
        match sig {
            libc::SIGCHLD => {
                if let Some(status) = reap(pid, &shared) {
                    // Let the app's last output reach the log before init (and the instance) ends.
                    for p in pumps {
                        let _ = p.join();
                    }
                    shared.flush(Duration::from_millis(500));
                    return status;
                }
            }
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT => {
                // SAFETY: plain syscall.
                unsafe { libc::kill(-pid, stop_signal) };
                if deadline.is_none() {
                    deadline = Some(Instant::now() + Duration::from_millis(config.stop_timeout_ms));
                }
            }
            other => {
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid, other) };
            }
        }
    }
}

/// Reaps every exited child; returns the app's status when the app itself exited.
///
/// Reaping happens with the exec sessions' lock held: an exec spawn holds that lock from fork
/// until its pid is registered, and std's `spawn` itself waits for a child whose `exec` failed, so
/// reaping during a spawn would steal that child from std (and lose the session's exit).
fn reap(app: libc::pid_t, shared: &channel::Shared) -> Option<ExitStatus> {
    let mut result = None;
    let mut finished = Vec::new();
    {
        let mut sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut raw = 0;
            // SAFETY: raw is a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let status = if libc::WIFEXITED(raw) {
                ExitStatus {
                    code: Some(libc::WEXITSTATUS(raw)),
                    signal: None,
                }
            } else if libc::WIFSIGNALED(raw) {
                ExitStatus {
                    code: None,
                    signal: Some(libc::WTERMSIG(raw)),
                }
            } else {
                continue;
            };
            if pid == app {
                result = Some(status);
            } else if let Some(session) = sessions.remove(&pid) {
                finished.push((session, status));
            }
        }
    }
    for (session, status) in finished {
        session.exited(shared, status);
    }
    result
}
