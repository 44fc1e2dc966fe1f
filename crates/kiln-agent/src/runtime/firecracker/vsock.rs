//! The host end of Firecracker's hybrid vsock (host-initiated connections).
//!
//! Protocol walk-through, as Firecracker documents it (`docs/vsock.md`):
//! 1. Firecracker listens on the Unix socket named by the vsock device's `uds_path` (`v.sock`);
//! 2. the host connects to it and sends `CONNECT <port>\n` (decimal port, ASCII LF);
//! 3. Firecracker connects to the guest's AF_VSOCK listener on that port; when the guest
//!    accepts, it answers `OK <host port>\n` (the port it assigned to the host end) and from then
//!    on the Unix connection carries the guest stream's bytes;
//! 4. when no one listens on the port (the guest is still booting), Firecracker closes the
//!    connection instead: the caller retries.
//!
//! The acknowledgement is read one byte at a time, so not a byte of the guest's stream that may
//! follow it is consumed here; it is bounded ([`MAX_ACK`]), timed out, and parsed totally.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest acknowledgement line accepted (`OK 4294967295\n` is 14 bytes).
pub const MAX_ACK: usize = 32;

/// The hybrid vsock handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot connect to the VM's vsock socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O on the vsock socket failed during the handshake")]
    Io {
        #[source]
        source: std::io::Error,
    },
    #[error("Firecracker closed the connection: nothing listens on guest port {port} (yet)")]
    Refused { port: u32 },
    #[error("no acknowledgement for guest port {port} within {timeout_ms} ms")]
    Timeout { port: u32, timeout_ms: u64 },
    #[error("unexpected acknowledgement {line:?}")]
    Malformed { line: String },
    #[error("acknowledgement longer than {MAX_ACK} bytes")]
    TooLong,
    #[error("guest port {port} not reached within {waited_ms} ms (last: {last})")]
    GaveUp {
        port: u32,
        waited_ms: u64,
        last: String,
    },
}

impl VsockError {
    /// Whether trying again can help: the guest may not listen yet, or may be slow to accept.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            VsockError::Connect { .. }
                | VsockError::Refused { .. }
                | VsockError::Timeout { .. }
                | VsockError::Io { .. }
        )
    }
}

/// Parses an acknowledgement line (without its `\n`): `OK <port>`. Total.
pub fn parse_ack(line: &[u8]) -> Result<u32, VsockError> {
    let malformed = || VsockError::Malformed {
        line: String::from_utf8_lossy(line)
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
    };
    let rest = line.strip_prefix(b"OK ").ok_or_else(malformed)?;
    if rest.is_empty() || rest.len() > 10 || !rest.iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    std::str::from_utf8(rest)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)
}

/// Sends `CONNECT <port>\n` on a fresh connection and reads the acknowledgement; returns the
/// host-side port Firecracker assigned. On success the stream carries the guest's bytes.
pub async fn handshake(
    stream: &mut UnixStream,
    port: u32,
    timeout: Duration,
) -> Result<u32, VsockError> {
    let exchange = async {
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|source| VsockError::Io { source })?;
        let mut line = Vec::with_capacity(16);
        let mut byte = [0u8; 1];
        loop {
            let n = stream
                .read(&mut byte)
                .await
                .map_err(|source| VsockError::Io { source })?;
            if n == 0 {
                return Err(if line.is_empty() {
                    VsockError::Refused { port }
                } else {
                    VsockError::Malformed {
                        line: String::from_utf8_lossy(&line).into_owned(),
                    }
                });
            }
            if byte[0] == b'\n' {
                return parse_ack(&line);
            }
            if line.len() >= MAX_ACK {
                return Err(VsockError::TooLong);
            }
            line.push(byte[0]);
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| VsockError::Timeout {
            port,
            timeout_ms: timeout.as_millis() as u64,
        })?
}

/// Connects to `socket` and completes the handshake for `port`, in one attempt.
pub async fn connect_once(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VsockError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| VsockError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
    handshake(&mut stream, port, timeout).await?;
    Ok(stream)
}

/// Connects to the guest's `port` through `socket`, retrying while the guest is booting (the
/// socket is not there yet, or nothing listens on the port) until `wait` has passed. A malformed
/// acknowledgement is not retried: the peer does not speak the protocol.
pub async fn connect(socket: &Path, port: u32, wait: Duration) -> Result<UnixStream, VsockError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut delay = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = connect_once(socket, port, left.min(Duration::from_secs(2))).await;
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => {
                if tokio::time::Instant::now() + delay >= deadline {
                    return Err(VsockError::GaveUp {
                        port,
                        waited_ms: wait.as_millis() as u64,
                        last: e.to_string(),
                    });
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's guest channel over the hybrid vsock, against a stand-in that follows
    /// Firecracker's documented protocol: nothing listens for the first connection (closed),
    /// then `OK <port>\n` and the guest's bytes. The agent must retry, complete the handshake,
    /// greet the guest with `Hello` and take the guest's log frames.
    #[tokio::test]
    async fn the_guest_channel_runs_over_the_handshake() {
        use kiln_types::frame::{Frame, FrameReader, Output, PROTOCOL_VERSION};
        use tokio::net::UnixListener;

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("v.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (hello_tx, mut hello_rx) = tokio::sync::mpsc::channel::<Frame>(4);
        tokio::spawn(async move {
            let mut attempt = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                attempt += 1;
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).await.unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if line != b"CONNECT 52" || attempt == 1 {
                    continue; // closed: the guest does not listen yet
                }
                let mut out = b"OK 1073741824\n".to_vec();
                out.extend(
                    Frame::Hello {
                        version: PROTOCOL_VERSION,
                    }
                    .to_bytes(),
                );
                out.extend(
                    Frame::Log {
                        output: Output::Stdout,
                        ts_ms: 1,
                        bytes: b"booted\n".to_vec(),
                    }
                    .to_bytes(),
                );
                s.write_all(&out).await.unwrap();
                let mut reader = FrameReader::new();
                let mut buf = [0u8; 1024];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    reader.push(&buf[..n]);
                    while let Ok(Some(f)) = reader.next_frame() {
                        let _ = hello_tx.send(f).await;
                    }
                }
            }
        });
        let guest = crate::guest::Guest::new_hybrid_vsock(
            kiln_types::InstanceId::generate(),
            kiln_types::AppId::generate(),
            socket,
            GUEST_PORT,
        );
        let (logs_tx, mut logs_rx) = tokio::sync::mpsc::channel(8);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(guest.clone().run(logs_tx, stop_rx));
        let first = tokio::time::timeout(Duration::from_secs(10), hello_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(first, Frame::Hello { .. }), "{first:?}");
        let record = tokio::time::timeout(Duration::from_secs(10), logs_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.message, "booted");
        stop_tx.send_replace(true);
    }

    const GUEST_PORT: u32 = kiln_types::guest::VSOCK_CHANNEL_PORT;

    #[test]
    fn acknowledgements_parse_totally() {
        assert_eq!(parse_ack(b"OK 1073741824").unwrap(), 1_073_741_824);
        assert_eq!(parse_ack(b"OK 0").unwrap(), 0);
        for bad in [
            &b""[..],
            b"OK",
            b"OK ",
            b"ok 5",
            b"OK  5",
            b"OK 5 ",
            b"OK -5",
            b"OK 4294967296",
            b"OK 99999999999",
            b"ERR 5",
            b"\xff\x00",
        ] {
            assert!(
                matches!(parse_ack(bad), Err(VsockError::Malformed { .. })),
                "{bad:?}"
            );
        }
    }
}
