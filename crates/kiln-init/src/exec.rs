//! Commands run in the instance for `kiln exec`, with or without a pseudo-terminal.
//!
//! A session ends with one `Exit` frame, sent only after the command's output has been fully
//! forwarded: the exit status (from the main loop's reaping) and the end of each output pump are
//! counted, and whichever comes last sends it. Without a TTY stdout and stderr are separate
//! streams; with one they are merged, as on a terminal.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_types::frame::{ExecStart, ExitStatus, Frame, MAX_CHUNK};

use crate::channel::Shared;

/// A command output to forward, and whether it is stderr.
type OutputPipe = (Box<dyn Read + Send>, bool);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Progress {
    open_pumps: u8,
    status: Option<ExitStatus>,
    done: bool,
}

pub(crate) struct Session {
    stream: u32,
    pid: libc::pid_t,
    input: Mutex<Option<File>>,
    pty: Option<File>,
    progress: Mutex<Progress>,
}

impl Session {
    pub fn input(&self, bytes: &[u8]) {
        if let Some(f) = lock(&self.input).as_mut() {
            let _ = f.write_all(bytes);
        }
    }

    pub fn close_input(&self) {
        if self.pty.is_none() {
            lock(&self.input).take();
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) {
        if let Some(pty) = &self.pty {
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: a valid fd and a valid winsize pointer.
            unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain syscall; the session leads its own process group.
        unsafe { libc::kill(-self.pid, signal) };
    }

    pub fn exited(&self, shared: &Shared, status: ExitStatus) {
        lock(&self.progress).status = Some(status);
        self.maybe_finish(shared);
    }

    fn pump_done(&self, shared: &Shared) {
        {
            let mut p = lock(&self.progress);
            p.open_pumps = p.open_pumps.saturating_sub(1);
        }
        self.maybe_finish(shared);
    }

    fn maybe_finish(&self, shared: &Shared) {
        let status = {
            let mut p = lock(&self.progress);
            match p.status {
                Some(s) if p.open_pumps == 0 && !p.done => {
                    p.done = true;
                    s
                }
                _ => return,
            }
        };
        lock(&shared.streams).remove(&self.stream);
        shared.send(&Frame::Exit {
            stream: self.stream,
            status,
        });
    }
}

fn pump(
    mut from: impl Read,
    stream: u32,
    stderr: bool,
    session: Arc<Session>,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        // A PTY master reports EIO once the last slave closes: that is its end of file.
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let bytes = buf[..n].to_vec();
        let frame = if stderr {
            Frame::Stderr { stream, bytes }
        } else {
            Frame::Stdout { stream, bytes }
        };
        shared.send(&frame);
    }
    session.pump_done(&shared);
}

fn open_pty(rows: u16, cols: u16) -> std::io::Result<(File, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: out pointers are valid; name and termios may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty returned two fresh descriptors we now own.
    Ok(unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

/// Starts a command for stream `stream`; failures become an `Error` then an `Exit` frame.
pub(crate) fn start(shared: &Arc<Shared>, stream: u32, start: ExecStart) {
    if let Err(e) = try_start(shared, stream, &start) {
        shared.send(&Frame::Error {
            stream,
            message: format!(
                "cannot start {:?}: {e}",
                start.argv.first().map_or("", String::as_str)
            ),
        });
        shared.send(&Frame::Exit {
            stream,
            status: ExitStatus {
                code: Some(127),
                signal: None,
            },
        });
    }
}

fn try_start(shared: &Arc<Shared>, stream: u32, start: &ExecStart) -> std::io::Result<()> {
    let (program, args) = start
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    let config = &shared.config;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&config.env)
        .envs(start.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&config.workdir);
    if config.uid != 0 || config.gid != 0 {
        cmd.uid(config.uid).gid(config.gid);
    }
    crate::child_setup(&mut cmd);

    let pty = if start.tty {
        let (master, slave) = open_pty(start.rows, start.cols)?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        cmd.env(
            "TERM",
            config
                .env
                .get("TERM")
                .map_or("xterm-256color", String::as_str),
        );
        // SAFETY: after setsid (from child_setup), make the PTY on fd 0 the controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Some(master)
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        None
    };

    // Held across spawn: the main loop reaps only with this lock, so it neither reaps a child
    // whose exec failed before std's spawn waits for it, nor a quick exit before its session is
    // registered.
    let mut sessions = lock(&shared.sessions);
    let mut child = cmd.spawn()?;
    drop(cmd); // closes our copies of the PTY slave
    let pid = child.id() as libc::pid_t;
    let (input, outputs): (Option<File>, Vec<OutputPipe>) = match &pty {
        Some(master) => (
            Some(master.try_clone()?),
            vec![(Box::new(master.try_clone()?), false)],
        ),
        None => {
            let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
            let mut outs: Vec<OutputPipe> = Vec::new();
            if let Some(o) = child.stdout.take() {
                outs.push((Box::new(o), false));
            }
            if let Some(e) = child.stderr.take() {
                outs.push((Box::new(e), true));
            }
            (stdin, outs)
        }
    };
    // Reaped by the main loop, not by std.
    std::mem::forget(child);
    let session = Arc::new(Session {
        stream,
        pid,
        input: Mutex::new(input),
        pty,
        progress: Mutex::new(Progress {
            open_pumps: outputs.len() as u8,
            status: None,
            done: false,
        }),
    });
    sessions.insert(pid, session.clone());
    lock(&shared.streams).insert(stream, session.clone());
    drop(sessions);
    for (reader, is_stderr) in outputs {
        let (s, sh) = (session.clone(), shared.clone());
        std::thread::spawn(move || pump(reader, stream, is_stderr, s, sh));
    }
    Ok(())
}
