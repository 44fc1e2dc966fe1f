//! The host side of the guest channel (see `kiln_types::frame`).
//!
//! One [`Guest`] per instance keeps a connection to its kiln-init: it reconnects whenever the
//! connection drops while the instance runs, turns `Log` frames into log lines for the shipper,
//! and multiplexes exec sessions over stream ids. Everything a guest can push is bounded: a log
//! line is cut at [`MAX_LINE`], the writer queue is bounded, and an exec session whose reader
//! falls behind is dropped rather than buffered without limit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use kiln_api::LogRecord;
use kiln_types::frame::{ExecStart, Frame, FrameReader, Output};
use kiln_types::{AppId, InstanceId};

/// Longest log line forwarded; longer lines are cut into pieces of this size.
pub(crate) const MAX_LINE: usize = 16 * 1024;
/// Frames queued toward the guest.
const WRITE_QUEUE: usize = 256;
/// Frames queued toward one exec client.
const SESSION_QUEUE: usize = 256;

pub(crate) struct Guest {
    instance: InstanceId,
    app: AppId,
    socket: PathBuf,
    /// Firecracker's hybrid vsock: after connecting, ask for this guest port (`CONNECT <port>`).
    vsock_port: Option<u32>,
    writer: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    sessions: Mutex<HashMap<u32, mpsc::Sender<Frame>>>,
    next_stream: AtomicU32,
    connected: watch::Sender<bool>,
}

/// An exec session as the agent's caller sees it.
pub(crate) struct ExecSession {
    pub stream: u32,
    /// Frames from the guest for this session (Stdout, Stderr, Error, Exit).
    pub frames: mpsc::Receiver<Frame>,
    guest: Arc<Guest>,
}

impl ExecSession {
    /// Sends a frame for this session (Stdin, StdinClose, Resize, Signal) to the guest.
    pub async fn send(&self, frame: Frame) -> bool {
        self.guest.send(frame).await
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        self.guest
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.stream);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Guest {
    pub(crate) fn new(instance: InstanceId, app: AppId, socket: PathBuf) -> Arc<Guest> {
        Arc::new(Guest {
            instance,
            app,
            socket,
            vsock_port: None,
            writer: Mutex::new(None),
            sessions: Mutex::new(HashMap::new()),
            next_stream: AtomicU32::new(1),
            connected: watch::channel(false).0,
        })
    }

    /// A guest reached through Firecracker's hybrid vsock socket `socket`, on guest `port`.
    pub(crate) fn new_hybrid_vsock(
        instance: InstanceId,
        app: AppId,
        socket: PathBuf,
        port: u32,
    ) -> Arc<Guest> {
        let mut guest = Guest::new(instance, app, socket);
        if let Some(g) = Arc::get_mut(&mut guest) {
            g.vsock_port = Some(port);
        }
        guest
    }

    /// Connects to the guest's end: the socket itself, or through the hybrid vsock handshake.
    async fn connect(&self) -> Option<UnixStream> {
        match self.vsock_port {
            None => UnixStream::connect(&self.socket).await.ok(),
            Some(port) => {
                let attempt = crate::runtime::firecracker::vsock::connect_once(
                    &self.socket,
                    port,
                    Duration::from_secs(2),
                )
                .await;
                attempt
                    .map_err(|e| {
                        tracing::debug!(instance_id = %self.instance, error = %e, "guest vsock not reachable yet");
                    })
                    .ok()
            }
        }
    }

    pub(crate) async fn send(&self, frame: Frame) -> bool {
        let tx = lock(&self.writer).clone();
        match tx {
            Some(tx) => tx.send(frame.to_bytes()).await.is_ok(),
            None => false,
        }
    }

    /// Sends the instance's secrets file, waiting (up to `wait`) for the channel to be up. The
    /// bytes are only in memory, here and in the writer queue, never on the host's disk.
    pub(crate) async fn send_secrets(&self, frame: Frame, wait: Duration) -> bool {
        let mut connected = self.connected.subscribe();
        if tokio::time::timeout(wait, connected.wait_for(|c| *c))
            .await
            .is_err()
        {
            return false;
        }
        self.send(frame).await
    }

    /// Starts a command in the instance, waiting (up to `wait`) for the channel to be up.
    pub(crate) async fn exec(
        self: &Arc<Self>,
        start: ExecStart,
        wait: Duration,
    ) -> Option<ExecSession> {
        let mut connected = self.connected.subscribe();
        if tokio::time::timeout(wait, connected.wait_for(|c| *c))
            .await
            .is_err()
        {
            return None;
        }
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        lock(&self.sessions).insert(stream, tx);
        let session = ExecSession {
            stream,
            frames: rx,
            guest: self.clone(),
        };
        if !self.send(Frame::ExecStart { stream, start }).await {
            return None;
        }
        Some(session)
    }

    /// Keeps a connection to the guest until `stop` turns true.
    pub(crate) async fn run(
        self: Arc<Self>,
        logs: mpsc::Sender<LogRecord>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut delay = Duration::from_millis(20);
        loop {
            if *stop.borrow() {
                return;
            }
            match self.connect().await {
                Some(stream) => {
                    delay = Duration::from_millis(20);
                    tokio::select! {
                        _ = self.serve(stream, &logs) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                    *lock(&self.writer) = None;
                    self.connected.send_replace(false);
                    // Sessions cannot survive a lost connection: their clients see the end.
                    lock(&self.sessions).clear();
                }
                None => {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn serve(&self, stream: UnixStream, logs: &mpsc::Sender<LogRecord>) {
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
        let _ = tx
            .send(
                Frame::Hello {
                    version: kiln_types::frame::PROTOCOL_VERSION,
                }
                .to_bytes(),
            )
            .await;
        *lock(&self.writer) = Some(tx);
        // `connected` turns true on the guest's Hello, not here: a VM's serial socket accepts the
        // connection long before kiln-init opens its end.
        let writer = async move {
            while let Some(bytes) = rx.recv().await {
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        };
        let mut lines = LineSplitter::default();
        let reader = async {
            let mut reader = FrameReader::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                reader.push(&buf[..n]);
                loop {
                    match reader.next_frame() {
                        Ok(Some(frame)) => self.dispatch(frame, &mut lines, logs),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(instance_id = %self.instance, error = %e, "guest sent a bad frame; reconnecting");
                            return;
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = writer => {}
            _ = reader => {}
        }
    }

    fn dispatch(&self, frame: Frame, lines: &mut LineSplitter, logs: &mpsc::Sender<LogRecord>) {
        match frame {
            Frame::Hello { .. } => {
                self.connected.send_replace(true);
            }
            Frame::Log {
                output,
                ts_ms,
                bytes,
            } => {
                for message in lines.push(output, &bytes) {
                    let record = LogRecord {
                        instance_id: self.instance.clone(),
                        app_id: self.app.clone(),
                        ts_ms,
                        output,
                        message,
                    };
                    // A full queue means the control plane is away or slow: drop, never block the guest.
                    if logs.try_send(record).is_err() {
                        crate::logs::count_dropped(1);
                    }
                }
            }
            Frame::Stdout { stream, .. }
            | Frame::Stderr { stream, .. }
            | Frame::Exit { stream, .. }
            | Frame::Error { stream, .. } => {
                let tx = lock(&self.sessions).get(&stream).cloned();
                if let Some(tx) = tx {
                    let last = matches!(frame, Frame::Exit { .. });
                    if tx.try_send(frame).is_err() {
                        // The client is not reading: end its session instead of buffering.
                        lock(&self.sessions).remove(&stream);
                    } else if last {
                        lock(&self.sessions).remove(&stream);
                    }
                }
            }
            Frame::ExecStart { .. }
            | Frame::Stdin { .. }
            | Frame::StdinClose { .. }
            | Frame::Resize { .. }
            | Frame::Signal { .. }
            | Frame::Secrets { .. } => {}
        }
    }
}

/// Splits an output's chunks into lines, keeping a partial line until its end arrives.
#[derive(Default)]
struct LineSplitter {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, output: Output, bytes: &[u8]) -> Vec<String> {
        let buf = match output {
            Output::Stdout => &mut self.stdout,
            Output::Stderr => &mut self.stderr,
        };
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                out.push(String::from_utf8_lossy(buf).into_owned());
                buf.clear();
            } else {
                buf.push(b);
                if buf.len() >= MAX_LINE {
                    out.push(String::from_utf8_lossy(buf).into_owned());
                    buf.clear();
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_joined_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(Output::Stdout, b"a\nbc"), vec!["a"]);
        assert_eq!(s.push(Output::Stderr, b"x\n"), vec!["x"]);
        assert_eq!(s.push(Output::Stdout, b"d\n\n"), vec!["bcd", ""]);
        let long = vec![b'z'; MAX_LINE + 10];
        let got = s.push(Output::Stdout, &long);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), MAX_LINE);
    }
}
