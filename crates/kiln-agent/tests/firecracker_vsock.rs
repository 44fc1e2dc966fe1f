//! The host end of Firecracker's hybrid vsock against a stand-in peer.
//!
//! The stand-in implements Firecracker's documented protocol for host-initiated connections
//! (`docs/vsock.md`), not Kiln's expectations: it reads `CONNECT <port>\n` (decimal, LF), and
//! either closes the connection (nothing listens on that guest port, as while the guest boots)
//! or answers `OK <assigned host port>\n` and from then on carries the guest's bytes. Variants
//! answer slowly, badly or not at all. No Firecracker ran: these hosts cannot boot it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use kiln_agent::runtime::firecracker::vsock::{self, VsockError};

/// How the stand-in behaves once it has read a CONNECT line.
#[derive(Clone)]
enum Guest {
    /// Nothing listens for the first `n` connections, then `port` is served: `OK` followed at
    /// once (same write) by the guest's first bytes.
    ListensAfter {
        n: u32,
        port: u32,
        first: &'static [u8],
    },
    /// `OK` sent one byte at a time, `delay` apart.
    Slow { delay: Duration },
    /// An arbitrary answer, then the connection closes.
    Answers(&'static [u8]),
    /// Never answers.
    Silent,
}

/// Reads the CONNECT line the way Firecracker does: up to LF, `CONNECT ` and a decimal port.
async fn read_connect(s: &mut UnixStream) -> Option<u32> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b).await.ok()? == 0 || line.len() > 32 {
            return None;
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    let text = String::from_utf8(line).ok()?;
    text.strip_prefix("CONNECT ")?.parse().ok()
}

fn peer(guest: Guest) -> (PathBuf, Arc<AtomicU32>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let count = attempts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let attempt = count.fetch_add(1, Ordering::SeqCst);
            let guest = guest.clone();
            tokio::spawn(async move {
                let Some(port) = read_connect(&mut s).await else {
                    return;
                };
                match guest {
                    Guest::ListensAfter { n, port: p, first } => {
                        if attempt < n || port != p {
                            return; // dropped: Firecracker closes the host connection
                        }
                        let mut out = b"OK 1073741824\n".to_vec();
                        out.extend_from_slice(first);
                        let _ = s.write_all(&out).await;
                        // Echo what the host sends from now on.
                        let mut buf = [0u8; 64];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                    Guest::Slow { delay } => {
                        for b in b"OK 1073741825\n" {
                            tokio::time::sleep(delay).await;
                            let _ = s.write_all(&[*b]).await;
                        }
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    Guest::Answers(bytes) => {
                        let _ = s.write_all(bytes).await;
                    }
                    Guest::Silent => tokio::time::sleep(Duration::from_secs(3600)).await,
                }
            });
        }
    });
    (socket, attempts, dir)
}

#[tokio::test]
async fn the_handshake_leaves_the_guests_bytes_in_the_stream() {
    let (socket, _, _dir) = peer(Guest::ListensAfter {
        n: 0,
        port: 52,
        first: b"HELLO-FRAME",
    });
    let mut s = UnixStream::connect(&socket).await.unwrap();
    let host_port = vsock::handshake(&mut s, 52, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(host_port, 1_073_741_824);
    let mut first = [0u8; 11];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(
        &first, b"HELLO-FRAME",
        "not a byte after the OK line was consumed"
    );
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
}

#[tokio::test]
async fn connect_retries_while_the_guest_boots() {
    let (socket, attempts, _dir) = peer(Guest::ListensAfter {
        n: 3,
        port: 52,
        first: b"",
    });
    let once = vsock::connect_once(&socket, 52, Duration::from_secs(5)).await;
    assert!(
        matches!(once, Err(VsockError::Refused { port: 52 })),
        "{once:?}"
    );
    vsock::connect(&socket, 52, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_missing_socket_or_wrong_port_gives_up_with_the_last_reason() {
    let err = vsock::connect(
        &PathBuf::from("/nonexistent/v.sock"),
        52,
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, VsockError::GaveUp { .. }), "{err:?}");
    let (socket, _, _dir) = peer(Guest::ListensAfter {
        n: 0,
        port: 53,
        first: b"",
    });
    let err = vsock::connect(&socket, 52, Duration::from_millis(300))
        .await
        .unwrap_err();
    match err {
        VsockError::GaveUp { last, .. } => assert!(last.contains("port 52"), "{last}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_slow_acknowledgement_is_waited_for() {
    let (socket, _, _dir) = peer(Guest::Slow {
        delay: Duration::from_millis(20),
    });
    let mut s = UnixStream::connect(&socket).await.unwrap();
    let port = vsock::handshake(&mut s, 52, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(port, 1_073_741_825);
}

#[tokio::test]
async fn a_silent_peer_times_out() {
    let (socket, _, _dir) = peer(Guest::Silent);
    let mut s = UnixStream::connect(&socket).await.unwrap();
    let err = vsock::handshake(&mut s, 52, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        matches!(err, VsockError::Timeout { port: 52, .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn malformed_acknowledgements_are_errors_and_not_retried() {
    for (answer, long) in [
        (&b"ERROR\n"[..], false),
        (b"OK\n", false),
        (b"OK port\n", false),
        (b"ok 5\n", false),
        (b"OK 5 6\n", false),
        (b"HTTP/1.1 400 Bad Request\r\n", false),
        (b"OK 5", false), // closed without LF
        (b"OK 1111111111111111111111111111111111111111\n", true),
    ] {
        let (socket, attempts, _dir) = peer(Guest::Answers(answer));
        let started = std::time::Instant::now();
        let err = vsock::connect(&socket, 52, Duration::from_secs(10))
            .await
            .unwrap_err();
        if long {
            assert!(matches!(err, VsockError::TooLong), "{err:?}");
        } else {
            assert!(matches!(err, VsockError::Malformed { .. }), "{err:?}");
        }
        assert!(!err.is_retryable());
        assert_eq!(attempts.load(Ordering::SeqCst), 1, "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
