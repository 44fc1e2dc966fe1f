//! `kiln-init`: PID 1 inside every Kiln instance.
//!
//! It owns the instance's process lifecycle: read the run configuration the agent placed at
//! `/.kiln/run.json`, start the app with its argv, env, working directory and user, reap every
//! zombie (as PID 1 must), forward signals to the app, stop it gracefully (stop signal, timeout,
//! then SIGKILL), and record how it ended in `/.kiln/exit.json` before exiting with the app's
//! status. It depends only on `kiln-types` and libc so that it builds as a small static binary.
//!
//! Signal handling walk-through:
//! 1. all signals are blocked in init before the app is spawned; the child unblocks them before
//!    exec so the app starts with a clean mask;
//! 2. init waits with `sigtimedwait`, so signals arrive as values in one loop, with no async
//!    handlers and no races with `waitpid`;
//! 3. SIGCHLD → reap everything; termination signals → forward the configured stop signal and arm
//!    the stop deadline; other signals are forwarded as they are.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_types::guest::{RunConfig, RUN_CONFIG_PATH};

const EXIT_PATH: &str = "/.kiln/exit.json";

fn log(msg: &str) {
    eprintln!("kiln-init: {msg}");
}

fn signal_number(name: &str) -> libc::c_int {
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

fn write_exit(code: Option<i32>, signal: Option<i32>) {
    let body = match (code, signal) {
        (_, Some(s)) => format!("{{\"code\":null,\"signal\":{s}}}"),
        (Some(c), None) => format!("{{\"code\":{c},\"signal\":null}}"),
        _ => "{\"code\":null,\"signal\":null}".to_owned(),
    };
    let _ = std::fs::write(EXIT_PATH, body);
}

fn main() {
    let config: RunConfig = match std::fs::read(RUN_CONFIG_PATH)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            log(&format!("cannot read {RUN_CONFIG_PATH}: {e}"));
            write_exit(Some(127), None);
            std::process::exit(127);
        }
    };
    std::process::exit(run(config));
}

fn run(config: RunConfig) -> i32 {
    let all = full_sigset();
    // SAFETY: blocking signals in our own thread; the set is initialised.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut()) };

    let Some((program, args)) = config.argv.split_first() else {
        log("run configuration has an empty argv");
        write_exit(Some(127), None);
        return 127;
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&config.env)
        .current_dir(&config.workdir);
    if config.uid != 0 || config.gid != 0 {
        // std drops root's supplementary groups when it switches uid.
        cmd.uid(config.uid).gid(config.gid);
    }
    // SAFETY: between fork and exec only async-signal-safe calls are made (sigprocmask, setsid).
    unsafe {
        cmd.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Own session and process group, so a stop signal can reach the app's whole group.
            libc::setsid();
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            log(&format!("cannot start {program:?}: {e}"));
            write_exit(Some(127), None);
            return 127;
        }
    };
    let pid = child.id() as libc::pid_t;
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
                if let Some(status) = reap(pid) {
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

/// Reaps every exited child; returns the exit status to use when the app itself exited.
fn reap(app: libc::pid_t) -> Option<i32> {
    let mut result = None;
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return result;
        }
        if pid == app {
            if libc::WIFEXITED(status) {
                let code = libc::WEXITSTATUS(status);
                write_exit(Some(code), None);
                result = Some(code);
            } else if libc::WIFSIGNALED(status) {
                let sig = libc::WTERMSIG(status);
                write_exit(None, Some(sig));
                result = Some(128 + sig);
            }
        }
    }
}
