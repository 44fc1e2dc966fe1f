//! The guest channel's framing: one byte-stream protocol between a host agent and `kiln-init`.
//!
//! The same frames travel over Firecracker's hybrid vsock, a QEMU virtio-serial port or a Unix
//! socket under runc, and, for exec, over the WebSocket between the CLI, the control plane and the
//! agent: the transport only carries bytes.
//!
//! Walk-through of a session:
//! 1. the agent connects (or, under a VM, opens the port) and both sides send [`Frame::Hello`]
//!    with their protocol version; a peer of another major version is dropped;
//! 2. the guest streams [`Frame::Log`] records of the app's stdout and stderr, each with its own
//!    timestamp, for as long as the connection lives;
//! 3. the agent starts a command with [`Frame::ExecStart`] on a fresh stream id; both sides then
//!    exchange `Stdin`/`Stdout`/`Stderr`/`Resize`/`Signal` on that stream until the guest sends
//!    [`Frame::Exit`], which ends the stream;
//! 4. the agent sends [`Frame::Secrets`] (stream 0) with the instance's secrets file: before the
//!    app starts (kiln-init waits for it when the run configuration names a secrets version) and,
//!    for apps that reload in place, whenever a newer version exists (kiln-init replaces the file
//!    and signals the app). Its bytes are [`Redacted`] so that no `Debug` print shows them.
//!
//! Wire format: `len: u32 BE` (of everything after it) · `kind: u8` · `stream: u32 BE` · payload.
//! Byte payloads are raw; structured payloads are JSON. Decoding is total and bounded: any input
//! yields a frame, "need more bytes", or an error, never a panic, and no frame exceeds
//! [`MAX_FRAME_LEN`].

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame body (kind + stream + payload) accepted.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Largest chunk of bytes put in one data frame by senders in this crate's users.
pub const MAX_CHUNK: usize = 32 * 1024;

const HEADER_LEN: usize = 4;
const BODY_MIN: usize = 5;

/// Which output a log record or data frame came from.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    Stdout,
    Stderr,
}

/// A command to run in the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStart {
    pub argv: Vec<String>,
    /// Extra environment on top of the app's.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Allocate a pseudo-terminal (stdout and stderr merge into it).
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + signal.
    pub fn as_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => 255,
        }
    }
}

/// Bytes that must not appear in a log line: their `Debug` shows only the length.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Redacted(pub Vec<u8>);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redacted({} bytes)", self.0.len())
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u32,
    },
    /// A line or chunk the app wrote, with the guest's wall-clock time in ms since the epoch.
    Log {
        output: Output,
        ts_ms: i64,
        bytes: Vec<u8>,
    },
    ExecStart {
        stream: u32,
        start: ExecStart,
    },
    Stdin {
        stream: u32,
        bytes: Vec<u8>,
    },
    /// No more stdin for this stream.
    StdinClose {
        stream: u32,
    },
    Stdout {
        stream: u32,
        bytes: Vec<u8>,
    },
    Stderr {
        stream: u32,
        bytes: Vec<u8>,
    },
    Resize {
        stream: u32,
        rows: u16,
        cols: u16,
    },
    Signal {
        stream: u32,
        signal: i32,
    },
    Exit {
        stream: u32,
        status: ExitStatus,
    },
    /// The stream (or, with stream 0, the session) failed; the message is for people.
    Error {
        stream: u32,
        message: String,
    },
    /// The instance's secrets file (JSON, see `kiln_types::secrets::SecretsFile`) at `version`.
    /// `update` when it replaces a file the running app already has.
    Secrets {
        version: u64,
        update: bool,
        file: Redacted,
    },
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {0} is outside 5..={MAX_FRAME_LEN}")]
    BadLength(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame kind {kind} has a malformed payload: {reason}")]
    BadPayload { kind: u8, reason: String },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const LOG: u8 = 2;
    pub const EXEC_START: u8 = 3;
    pub const STDIN: u8 = 4;
    pub const STDIN_CLOSE: u8 = 5;
    pub const STDOUT: u8 = 6;
    pub const STDERR: u8 = 7;
    pub const RESIZE: u8 = 8;
    pub const SIGNAL: u8 = 9;
    pub const EXIT: u8 = 10;
    pub const ERROR: u8 = 11;
    pub const SECRETS: u8 = 12;
}

fn put_header(out: &mut Vec<u8>, kind: u8, stream: u32, payload_len: usize) {
    let len = (BODY_MIN + payload_len) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&stream.to_be_bytes());
}

impl Frame {
    /// Appends the encoded frame to `out`. Payloads larger than [`MAX_FRAME_LEN`] are the
    /// caller's bug: senders chunk data at [`MAX_CHUNK`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        let json = |v: &dyn erased::Json| v.to_json();
        match self {
            Frame::Hello { version } => {
                put_header(out, kind::HELLO, 0, 4);
                out.extend_from_slice(&version.to_be_bytes());
            }
            Frame::Log {
                output,
                ts_ms,
                bytes,
            } => {
                put_header(out, kind::LOG, 0, 9 + bytes.len());
                out.push(match output {
                    Output::Stdout => 1,
                    Output::Stderr => 2,
                });
                out.extend_from_slice(&ts_ms.to_be_bytes());
                out.extend_from_slice(bytes);
            }
            Frame::ExecStart { stream, start } => {
                let body = json(start);
                put_header(out, kind::EXEC_START, *stream, body.len());
                out.extend_from_slice(&body);
            }
            Frame::Stdin { stream, bytes } => {
                put_header(out, kind::STDIN, *stream, bytes.len());
                out.extend_from_slice(bytes);
            }
            Frame::StdinClose { stream } => put_header(out, kind::STDIN_CLOSE, *stream, 0),
            Frame::Stdout { stream, bytes } => {
                put_header(out, kind::STDOUT, *stream, bytes.len());
                out.extend_from_slice(bytes);
            }
            Frame::Stderr { stream, bytes } => {
                put_header(out, kind::STDERR, *stream, bytes.len());
                out.extend_from_slice(bytes);
            }
            Frame::Resize { stream, rows, cols } => {
                put_header(out, kind::RESIZE, *stream, 4);
                out.extend_from_slice(&rows.to_be_bytes());
                out.extend_from_slice(&cols.to_be_bytes());
            }
            Frame::Signal { stream, signal } => {
                put_header(out, kind::SIGNAL, *stream, 4);
                out.extend_from_slice(&signal.to_be_bytes());
            }
            Frame::Exit { stream, status } => {
                let body = json(status);
                put_header(out, kind::EXIT, *stream, body.len());
                out.extend_from_slice(&body);
            }
            Frame::Error { stream, message } => {
                put_header(out, kind::ERROR, *stream, message.len());
                out.extend_from_slice(message.as_bytes());
            }
            Frame::Secrets {
                version,
                update,
                file,
            } => {
                put_header(out, kind::SECRETS, 0, 9 + file.0.len());
                out.extend_from_slice(&version.to_be_bytes());
                out.push(u8::from(*update));
                out.extend_from_slice(&file.0);
            }
        }
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one frame from the start of `buf`: `Ok(None)` when more bytes are needed,
    /// `Ok(Some((frame, consumed)))` otherwise. An error is final for the connection.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some(len_bytes) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len =
            u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        if !(BODY_MIN..=MAX_FRAME_LEN).contains(&len) {
            return Err(FrameError::BadLength(len));
        }
        let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let k = body[0];
        let stream = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
        let p = &body[BODY_MIN..];
        let bad = |reason: &str| FrameError::BadPayload {
            kind: k,
            reason: reason.to_owned(),
        };
        let fixed = |n: usize| -> Result<&[u8], FrameError> {
            if p.len() == n {
                Ok(p)
            } else {
                Err(bad(&format!("expected {n} bytes, got {}", p.len())))
            }
        };
        let frame = match k {
            kind::HELLO => {
                let b = fixed(4)?;
                Frame::Hello {
                    version: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                }
            }
            kind::LOG => {
                if p.len() < 9 {
                    return Err(bad("log record shorter than its header"));
                }
                let output = match p[0] {
                    1 => Output::Stdout,
                    2 => Output::Stderr,
                    _ => return Err(bad("unknown output")),
                };
                let mut ts = [0u8; 8];
                ts.copy_from_slice(&p[1..9]);
                Frame::Log {
                    output,
                    ts_ms: i64::from_be_bytes(ts),
                    bytes: p[9..].to_vec(),
                }
            }
            kind::EXEC_START => Frame::ExecStart {
                stream,
                start: serde_json::from_slice(p).map_err(|e| bad(&e.to_string()))?,
            },
            kind::STDIN => Frame::Stdin {
                stream,
                bytes: p.to_vec(),
            },
            kind::STDIN_CLOSE => {
                fixed(0)?;
                Frame::StdinClose { stream }
            }
            kind::STDOUT => Frame::Stdout {
                stream,
                bytes: p.to_vec(),
            },
            kind::STDERR => Frame::Stderr {
                stream,
                bytes: p.to_vec(),
            },
            kind::RESIZE => {
                let b = fixed(4)?;
                Frame::Resize {
                    stream,
                    rows: u16::from_be_bytes([b[0], b[1]]),
                    cols: u16::from_be_bytes([b[2], b[3]]),
                }
            }
            kind::SIGNAL => {
                let b = fixed(4)?;
                Frame::Signal {
                    stream,
                    signal: i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                }
            }
            kind::EXIT => Frame::Exit {
                stream,
                status: serde_json::from_slice(p).map_err(|e| bad(&e.to_string()))?,
            },
            kind::ERROR => Frame::Error {
                stream,
                message: String::from_utf8_lossy(p).into_owned(),
            },
            kind::SECRETS => {
                if stream != 0 {
                    return Err(bad("secrets frames use stream 0"));
                }
                if p.len() < 9 {
                    return Err(bad("secrets frame shorter than its header"));
                }
                let mut v = [0u8; 8];
                v.copy_from_slice(&p[..8]);
                let update = match p[8] {
                    0 => false,
                    1 => true,
                    _ => return Err(bad("update flag is neither 0 nor 1")),
                };
                Frame::Secrets {
                    version: u64::from_be_bytes(v),
                    update,
                    file: Redacted(p[9..].to_vec()),
                }
            }
            other => return Err(FrameError::UnknownKind(other)),
        };
        Ok(Some((frame, HEADER_LEN + len)))
    }
}

/// JSON encoding for the structured payloads, without exposing serde in `encode`'s signature.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

/// Accumulates bytes from a transport and yields whole frames; holds at most one partial frame.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the transport.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match Frame::decode(&self.buf)? {
            Some((frame, used)) => {
                self.buf.drain(..used);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: PROTOCOL_VERSION,
            },
            Frame::Log {
                output: Output::Stderr,
                ts_ms: 1_700_000_000_123,
                bytes: b"line\n".to_vec(),
            },
            Frame::ExecStart {
                stream: 7,
                start: ExecStart {
                    argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                    env: vec![("A".into(), "b".into())],
                    tty: true,
                    rows: 24,
                    cols: 80,
                },
            },
            Frame::Stdin {
                stream: 7,
                bytes: vec![0, 1, 2, 255],
            },
            Frame::StdinClose { stream: 7 },
            Frame::Stdout {
                stream: 7,
                bytes: b"out".to_vec(),
            },
            Frame::Stderr {
                stream: 7,
                bytes: vec![],
            },
            Frame::Resize {
                stream: 7,
                rows: 50,
                cols: 132,
            },
            Frame::Signal {
                stream: 7,
                signal: 15,
            },
            Frame::Exit {
                stream: 7,
                status: ExitStatus {
                    code: Some(3),
                    signal: None,
                },
            },
            Frame::Error {
                stream: 0,
                message: "no such instance".into(),
            },
            Frame::Secrets {
                version: 7,
                update: true,
                file: Redacted(
                    br#"{"version":7,"app":"a","env":"production","secrets":{"K":"v"}}"#.to_vec(),
                ),
            },
            Frame::Secrets {
                version: 1,
                update: false,
                file: Redacted(vec![]),
            },
        ]
    }

    #[test]
    fn secrets_frames_never_debug_print_their_bytes() {
        let f = Frame::Secrets {
            version: 3,
            update: false,
            file: Redacted(b"hunter2-secret".to_vec()),
        };
        assert!(!format!("{f:?}").contains("hunter2"));
        assert!(matches!(
            Frame::decode(&[
                0,
                0,
                0,
                14,
                kind::SECRETS,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                1,
                2
            ]),
            Err(FrameError::BadPayload { .. })
        ));
        assert!(matches!(
            Frame::decode(&[0, 0, 0, 9, kind::SECRETS, 0, 0, 0, 0, 1, 2, 3, 4]),
            Err(FrameError::BadPayload { .. })
        ));
    }

    #[test]
    fn every_frame_round_trips_at_every_split() {
        let mut wire = Vec::new();
        for f in all() {
            f.encode(&mut wire);
        }
        for cut in 0..=wire.len() {
            let mut r = FrameReader::new();
            let mut got = Vec::new();
            r.push(&wire[..cut]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
            r.push(&wire[cut..]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got, all(), "cut at {cut}");
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert_eq!(
            Frame::decode(&[0, 0, 0, 1, 1]),
            Err(FrameError::BadLength(1))
        );
        assert_eq!(
            Frame::decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::BadLength(u32::MAX as usize))
        );
        assert_eq!(
            Frame::decode(&[0, 0, 0, 5, 99, 0, 0, 0, 0]),
            Err(FrameError::UnknownKind(99))
        );
        assert!(matches!(
            Frame::decode(&[0, 0, 0, 6, kind::HELLO, 0, 0, 0, 0, 1]),
            Err(FrameError::BadPayload { .. })
        ));
        assert!(matches!(
            Frame::decode(&[0, 0, 0, 6, kind::EXIT, 0, 0, 0, 0, b'{']),
            Err(FrameError::BadPayload { .. })
        ));
        assert_eq!(Frame::decode(&[0, 0, 0, 9, kind::STDOUT]), Ok(None));
        // A deterministic mutation sweep over valid frames: nothing may panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for f in all() {
            let base = f.to_bytes();
            for _ in 0..2_000 {
                let mut m = base.clone();
                let i = (next() as usize) % m.len();
                m[i] ^= (next() & 0xff) as u8;
                let cut = (next() as usize) % (m.len() + 1);
                let _ = Frame::decode(&m[..cut]);
            }
        }
    }
}
