//! A minimal HTTP/1.1 client for Firecracker's API socket.
//!
//! Protocol walk-through (Firecracker's `micro_http` server, one Unix socket per VM):
//! 1. connect to `<jail root>/api.sock` (it appears once Firecracker runs; [`ApiClient::wait`]);
//! 2. send one request, `PUT <path> HTTP/1.1` with `Content-Type: application/json` and a
//!    `Content-Length`, the JSON body after the blank line;
//! 3. read the status line and headers (at most [`MAX_HEAD`] bytes), then exactly
//!    `Content-Length` bytes of body (at most [`MAX_BODY`]); `204 No Content` has none;
//! 4. 2xx is success; anything else is a fault, whose body is `{"fault_message": "..."}`.
//!
//! One connection per request keeps the client stateless; a request is a few per VM start. The
//! VMM runs guest-influenced code, so its answers are untrusted: the parser is total, bounded
//! and timed out, and a fault message is cut to [`MAX_FAULT`] characters before it is logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest status line + headers accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Longest response body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Characters of a fault message kept.
pub const MAX_FAULT: usize = 512;

/// A call on the API socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    #[error("cannot connect to Firecracker's API socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Firecracker's API socket {socket} did not appear within {waited_ms} ms")]
    NoSocket { socket: PathBuf, waited_ms: u64 },
    #[error("{method} {path}: I/O on the API socket failed")]
    Io {
        method: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path}: no answer within {timeout_ms} ms")]
    Timeout {
        method: String,
        path: String,
        timeout_ms: u64,
    },
    #[error("{method} {path}: malformed response: {reason}")]
    Malformed {
        method: String,
        path: String,
        reason: ResponseError,
    },
    #[error("{method} {path}: Firecracker answered {status}: {fault}")]
    Fault {
        method: String,
        path: String,
        status: u16,
        fault: String,
    },
}

/// Why a response could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the connection closed before the response was complete")]
    Truncated,
    #[error("the head is longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("bad status line")]
    StatusLine,
    #[error("bad header line")]
    Header,
    #[error("bad Content-Length")]
    ContentLength,
    #[error("body of {0} bytes is over the limit")]
    BodyTooLong(usize),
    #[error("chunked transfer encoding is not supported")]
    Chunked,
}

/// The parsed status line and the headers the client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
}

/// Parses a response head (everything before the blank line, without it). Total: any bytes give
/// a head or an error.
pub fn parse_head(bytes: &[u8]) -> Result<Head, ResponseError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ResponseError::Header)?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(ResponseError::StatusLine);
    }
    let status: u16 = code.parse().map_err(|_| ResponseError::StatusLine)?;
    if !(100..=599).contains(&status) {
        return Err(ResponseError::StatusLine);
    }
    let mut content_length = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(ResponseError::Header)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| ResponseError::ContentLength)?;
            if content_length.is_some_and(|m| m != n) {
                return Err(ResponseError::ContentLength);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(ResponseError::Chunked);
        }
    }
    Ok(Head {
        status,
        content_length,
    })
}

/// The fault message of an error body, cut to [`MAX_FAULT`] characters (or the raw body's start
/// when it is not the documented JSON).
pub fn fault_message(body: &[u8]) -> String {
    let msg = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let msg: String = msg
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_FAULT)
        .collect();
    if msg.is_empty() {
        "no fault message".into()
    } else {
        msg
    }
}

/// A client of one VM's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client of the socket at `socket`; each call must finish within `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> ApiClient {
        ApiClient {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits up to `wait` for the socket to accept connections (Firecracker creates it as it
    /// starts).
    pub async fn wait(&self, wait: Duration) -> Result<(), ApiCallError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut delay = Duration::from_millis(5);
        loop {
            if UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiCallError::NoSocket {
                    socket: self.socket.clone(),
                    waited_ms: wait.as_millis() as u64,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// `PUT path` with a JSON body; Ok when Firecracker answers 2xx.
    pub async fn put(&self, path: &str, body: &Value) -> Result<(), ApiCallError> {
        self.call("PUT", path, Some(body)).await.map(|_| ())
    }

    /// `GET path`; the JSON body of a 2xx answer.
    pub async fn get(&self, path: &str) -> Result<Value, ApiCallError> {
        let body = self.call("GET", path, None).await?;
        Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Vec<u8>, ApiCallError> {
        let timeout_err = || ApiCallError::Timeout {
            method: method.into(),
            path: path.into(),
            timeout_ms: self.timeout.as_millis() as u64,
        };
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| timeout_err())?
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Vec<u8>, ApiCallError> {
        let mut stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiCallError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let io = |source| ApiCallError::Io {
            method: method.into(),
            path: path.into(),
            source,
        };
        let malformed = |reason| ApiCallError::Malformed {
            method: method.into(),
            path: path.into(),
            reason,
        };
        let body = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if method != "GET" {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(&body);
        stream.write_all(&bytes).await.map_err(io)?;

        // Read until the blank line; what follows it is the body's start.
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD {
                return Err(malformed(ResponseError::HeadTooLong));
            }
            let n = stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err(malformed(ResponseError::Truncated));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        if head_end > MAX_HEAD {
            return Err(malformed(ResponseError::HeadTooLong));
        }
        let head = parse_head(&buf[..head_end]).map_err(malformed)?;
        let mut body = buf.split_off(head_end + 4);
        let want = match (head.status, head.content_length) {
            (204 | 304, _) | (100..=199, _) => 0,
            (_, Some(n)) => n,
            // Without a length the body ends with the connection.
            (_, None) => MAX_BODY + 1,
        };
        if let Some(n) = head.content_length {
            if n > MAX_BODY {
                return Err(malformed(ResponseError::BodyTooLong(n)));
            }
        }
        while body.len() < want {
            let n = stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                if head.content_length.is_none() {
                    break;
                }
                return Err(malformed(ResponseError::Truncated));
            }
            body.extend_from_slice(&chunk[..n]);
            if body.len() > MAX_BODY {
                return Err(malformed(ResponseError::BodyTooLong(body.len())));
            }
        }
        body.truncate(want);
        if (200..300).contains(&head.status) {
            Ok(body)
        } else {
            Err(ApiCallError::Fault {
                method: method.into(),
                path: path.into(),
                status: head.status,
                fault: fault_message(&body),
            })
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_and_bad_ones_are_errors() {
        assert_eq!(
            parse_head(b"HTTP/1.1 204 No Content\r\nServer: Firecracker API"),
            Ok(Head {
                status: 204,
                content_length: None
            })
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: 12"),
            Ok(Head {
                status: 400,
                content_length: Some(12)
            })
        );
        for bad in [
            &b""[..],
            b"HTTP/1.1",
            b"SSH-2.0 200 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 abc OK",
            b"HTTP/1.1 999 Nope",
            b"HTTP/1.1 200 OK\r\nno colon",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
            b"HTTP/1.1 200 \xff\xfe",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn fault_messages_are_cut_and_cleaned() {
        assert_eq!(
            fault_message(br#"{"fault_message":"The kernel file cannot be opened"}"#),
            "The kernel file cannot be opened"
        );
        let long = format!(r#"{{"fault_message":"{}\n"}}"#, "x".repeat(5000));
        assert_eq!(fault_message(long.as_bytes()).len(), MAX_FAULT);
        assert_eq!(fault_message(b"not json\x07"), "not json");
        assert_eq!(fault_message(b""), "no fault message");
    }
}
