//! The guest side of the guest channel: one agent connection at a time.
//!
//! Under runc kiln-init listens on a Unix socket; in a VM it serves the virtio-serial port, one
//! byte stream that the host connects to and disconnects from (see [`crate::vm::Port`]), or under
//! Firecracker listens on AF_VSOCK port 52 ([`crate::vsock`]). In
//! each case it serves the agent that connects: it sends `Hello`, then every log
//! record, and dispatches the agent's exec frames to [`crate::exec`]. A newer connection replaces
//! the older one (an agent restart reconnects). Log records produced while no agent is connected
//! wait in a bounded backlog; past its size the oldest are dropped and counted, so a disconnected
//! agent can never make init run out of memory.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_types::frame::{Frame, FrameReader, PROTOCOL_VERSION};
use kiln_types::guest::RunConfig;

use crate::exec::Session;

/// Bytes of log records kept while no agent is connected.
const BACKLOG_BYTES: usize = 1024 * 1024;

#[derive(Default)]
struct Backlog {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    dropped: u64,
}

/// A connection to the agent: a Unix socket (runc) or the VM's serial port.
pub(crate) trait Conn: Read + Write + Send {
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>>;
    fn close(&self);
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Conn for crate::vm::Port {
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()))
    }
    fn close(&self) {}
}

pub(crate) struct Shared {
    pub config: Arc<RunConfig>,
    conn: Mutex<Option<Box<dyn Conn>>>,
    backlog: Mutex<Backlog>,
    /// Exec sessions by child pid (for reaping) — held across spawn so a fast exit finds its session.
    pub sessions: Mutex<HashMap<libc::pid_t, Arc<Session>>>,
    /// Exec sessions by stream id (for input frames).
    pub streams: Mutex<HashMap<u32, Arc<Session>>>,
    secrets: Mutex<SecretsSlot>,
    secrets_arrived: Condvar,
}

/// Secrets frames: held until the app starts, then applied in place.
#[derive(Default)]
struct SecretsSlot {
    /// A file that arrived before the app started (version, bytes).
    pending: Option<(u64, Vec<u8>)>,
    /// The app's pid once started.
    app: Option<libc::pid_t>,
    /// The version on disk.
    installed: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(config: Arc<RunConfig>) -> Arc<Shared> {
        Arc::new(Shared {
            config,
            conn: Mutex::new(None),
            backlog: Mutex::new(Backlog::default()),
            sessions: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            secrets: Mutex::new(SecretsSlot::default()),
            secrets_arrived: Condvar::new(),
        })
    }

    /// Waits up to `wait` for the agent's first secrets frame.
    pub fn wait_for_secrets(&self, wait: Duration) -> Option<(u64, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut slot = lock(&self.secrets);
        loop {
            if let Some(p) = slot.pending.take() {
                return Some(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            slot = self
                .secrets_arrived
                .wait_timeout(slot, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// From now on secrets frames replace the file in place and signal `pid`; one that arrived
    /// meanwhile is applied now.
    pub fn app_started(&self, pid: libc::pid_t, installed: u64) {
        let pending = {
            let mut slot = lock(&self.secrets);
            slot.app = Some(pid);
            slot.installed = installed;
            slot.pending.take()
        };
        if let Some((version, bytes)) = pending {
            self.secrets_update(version, bytes);
        }
    }

    fn secrets_frame(&self, version: u64, bytes: Vec<u8>) {
        let started = {
            let mut slot = lock(&self.secrets);
            if slot.app.is_none() {
                slot.pending = Some((version, bytes));
                self.secrets_arrived.notify_all();
                return;
            }
            true
        };
        if started {
            self.secrets_update(version, bytes);
        }
    }

    /// Replaces the file of a running app with a newer version and signals the app.
    fn secrets_update(&self, version: u64, bytes: Vec<u8>) {
        let Some(secrets) = &self.config.secrets else {
            return;
        };
        let mut slot = lock(&self.secrets);
        if version <= slot.installed {
            return;
        }
        match crate::secrets::install(&bytes, self.config.uid, self.config.gid) {
            Ok(_) => {
                slot.installed = version;
                let sig = crate::signal_number(&secrets.reload_signal);
                if let Some(pid) = slot.app {
                    // SAFETY: plain syscall.
                    unsafe { libc::kill(pid, sig) };
                }
                crate::log(&format!(
                    "secrets version {version} installed; sent {} to the app",
                    secrets.reload_signal
                ));
            }
            Err(e) => {
                crate::log(&format!("secrets version {version} not installed: {e}"));
                self.send(&Frame::Error {
                    stream: 0,
                    message: format!("secrets version {version} not installed: {e}"),
                });
            }
        }
    }

    /// Sends a frame to the connected agent; false when none is connected or the write failed.
    pub fn send(&self, frame: &Frame) -> bool {
        let bytes = frame.to_bytes();
        let mut conn = lock(&self.conn);
        write_or_drop(&mut conn, &bytes)
    }

    /// Sends a log record, or keeps it in the backlog while no agent is connected.
    pub fn log(&self, frame: Frame) {
        let bytes = frame.to_bytes();
        let mut conn = lock(&self.conn);
        if write_or_drop(&mut conn, &bytes) {
            return;
        }
        let mut b = lock(&self.backlog);
        b.bytes += bytes.len();
        b.frames.push_back(bytes);
        while b.bytes > BACKLOG_BYTES {
            match b.frames.pop_front() {
                Some(old) => {
                    b.bytes -= old.len();
                    b.dropped += 1;
                }
                None => break,
            }
        }
    }

    /// Waits (up to `timeout`) for an agent to take the backlog, so the app's last words are not
    /// lost when it exits right before the agent connects.
    pub fn flush(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        while !lock(&self.backlog).frames.is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn attach(&self, stream: &dyn Conn) -> std::io::Result<()> {
        let mut conn = lock(&self.conn);
        let mut w = stream.try_clone_conn()?;
        w.write_all(
            &Frame::Hello {
                version: PROTOCOL_VERSION,
            }
            .to_bytes(),
        )?;
        let mut b = lock(&self.backlog);
        if b.dropped > 0 {
            let note = format!(
                "kiln-init: {} log records dropped while no agent was connected\n",
                b.dropped
            );
            let f = Frame::Log {
                output: kiln_types::frame::Output::Stderr,
                ts_ms: kiln_types::now_millis(),
                bytes: note.into_bytes(),
            };
            w.write_all(&f.to_bytes())?;
            b.dropped = 0;
        }
        while let Some(f) = b.frames.pop_front() {
            b.bytes -= f.len();
            w.write_all(&f)?;
        }
        if let Some(old) = conn.replace(w) {
            old.close();
        }
        Ok(())
    }

    /// Forgets the connection (the VM port's host went away), so records go to the backlog.
    fn detach(&self) {
        *lock(&self.conn) = None;
    }
}

fn write_or_drop(conn: &mut Option<Box<dyn Conn>>, bytes: &[u8]) -> bool {
    match conn {
        Some(s) => {
            if s.write_all(bytes).is_ok() {
                true
            } else {
                *conn = None;
                false
            }
        }
        None => false,
    }
}

/// Binds the channel socket and serves connections on a background thread.
pub(crate) fn listen(path: &str, shared: Arc<Shared>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let reader = match stream.try_clone() {
                Ok(r) => r,
                Err(_) => continue,
            };
            if shared.attach(&stream).is_err() {
                continue;
            }
            let s = shared.clone();
            std::thread::spawn(move || serve(reader, s));
        }
    });
    Ok(())
}

/// Serves one connection accepted by another listener (vsock) on its own thread; `reader` is a
/// second handle of the same connection.
pub(crate) fn serve_accepted<C: Conn + 'static>(stream: C, reader: C, shared: &Arc<Shared>) {
    if shared.attach(&stream).is_err() {
        return;
    }
    let s = shared.clone();
    std::thread::spawn(move || serve(reader, s));
}

/// Serves the VM's virtio-serial port on a background thread: every time a host connects, it
/// gets `Hello` and the backlog, then frames until it disconnects.
pub(crate) fn serve_port(port: crate::vm::Port, shared: Arc<Shared>) {
    std::thread::spawn(move || loop {
        port.wait_for_host();
        if shared.attach(&port).is_err() {
            shared.detach();
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        serve(port.try_clone(), shared.clone());
        shared.detach();
    });
}

/// Reads the agent's frames until the connection ends.
fn serve(mut stream: impl Conn, shared: Arc<Shared>) {
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        reader.push(&buf[..n]);
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => dispatch(frame, &shared),
                Ok(None) => break,
                Err(e) => {
                    shared.send(&Frame::Error {
                        stream: 0,
                        message: format!("bad frame: {e}"),
                    });
                    stream.close();
                    return;
                }
            }
        }
    }
}

fn dispatch(frame: Frame, shared: &Arc<Shared>) {
    match frame {
        Frame::Hello { .. } => {}
        Frame::ExecStart { stream, start } => crate::exec::start(shared, stream, start),
        Frame::Stdin { stream, bytes } => with_session(shared, stream, |s| s.input(&bytes)),
        Frame::StdinClose { stream } => with_session(shared, stream, |s| s.close_input()),
        Frame::Resize { stream, rows, cols } => {
            with_session(shared, stream, |s| s.resize(rows, cols))
        }
        // Stream 0 is the instance itself: the agent stops a VM by signalling init, which handles
        // it like a signal from a container runtime (stop signal to the app, deadline, SIGKILL).
        Frame::Signal { stream: 0, signal } if (1..32).contains(&signal) => {
            // SAFETY: plain syscall on our own pid.
            unsafe { libc::kill(libc::getpid(), signal) };
        }
        Frame::Signal { stream, signal } => with_session(shared, stream, |s| s.signal(signal)),
        Frame::Secrets { version, file, .. } => shared.secrets_frame(version, file.0),
        // Frames only the guest sends; an agent sending them is ignored.
        Frame::Log { .. }
        | Frame::Stdout { .. }
        | Frame::Stderr { .. }
        | Frame::Exit { .. }
        | Frame::Error { .. } => {}
    }
}

fn with_session(shared: &Shared, stream: u32, f: impl FnOnce(&Session)) {
    let s = lock(&shared.streams).get(&stream).cloned();
    if let Some(s) = s {
        f(&s);
    }
}
