//! Copying bytes both ways between a client and its backend, with an idle timeout.
//!
//! Unlike `tokio::io::copy_bidirectional`, which keeps an 8 KiB buffer per direction for the whole
//! life of a connection, each direction here takes a buffer only while bytes are moving and gives
//! it back as soon as its source has nothing more to read. An idle connection (the common case at
//! an edge: keep-alives, websockets, database sessions) then costs two sockets and a small task,
//! not two buffers; a busy one reads up to [`BUF_LEN`] bytes per system call.
//!
//! Half-close is preserved: when one side ends its stream, the other side's write half is shut
//! down and the opposite direction goes on until it ends too.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Bytes read per system call on a busy direction.
pub(crate) const BUF_LEN: usize = 64 * 1024;
/// The first buffer of a burst: most bursts (handshake flights, requests) are small, and only a
/// read that fills it switches the direction to [`BUF_LEN`].
const FIRST_BUF_LEN: usize = 16 * 1024;

/// How a splice ended badly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpliceError {
    #[error("client I/O failed")]
    Client(#[source] io::Error),
    #[error("backend I/O failed")]
    Backend(#[source] io::Error),
    #[error("no byte in either direction for {0:?}")]
    Idle(Duration),
}

/// Counts the bytes of one direction.
pub(crate) struct Direction<'a> {
    pub(crate) bytes: &'a AtomicU64,
}

/// Splices until both directions have ended, one side fails, or nothing moves for `idle`.
///
/// One hand-written poll loop over both directions rather than two joined async blocks: the
/// state of a spliced connection is two small [`Pump`]s and one timer, a few hundred bytes,
/// which is most of what an idle connection costs the edge.
pub(crate) async fn splice(
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
    up: Direction<'_>,
    down: Direction<'_>,
) -> Result<(), SpliceError> {
    let start = Instant::now();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    // Time of the last byte moved, in either direction.
    let mut last = start;
    let mut upstream = Pump::default();
    let mut downstream = Pump::default();
    std::future::poll_fn(|cx| {
        let mut moved = false;
        if !upstream.finished {
            if let Poll::Ready(Err(e)) =
                upstream.poll(cx, client, backend, up.bytes, &mut moved, Side::Client)
            {
                return Poll::Ready(Err(e));
            }
        }
        if !downstream.finished {
            if let Poll::Ready(Err(e)) =
                downstream.poll(cx, backend, client, down.bytes, &mut moved, Side::Backend)
            {
                return Poll::Ready(Err(e));
            }
        }
        if upstream.finished && downstream.finished {
            return Poll::Ready(Ok(()));
        }
        if moved {
            // Re-arming the timer only when it fires, rather than on every read, keeps timer
            // work off the data path.
            last = Instant::now();
        }
        while idle_timer.as_mut().poll(cx).is_ready() {
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return Poll::Ready(Err(SpliceError::Idle(idle)));
            }
            idle_timer
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
        }
        Poll::Pending
    })
    .await
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Backend,
}

impl Side {
    fn err(self, e: io::Error) -> SpliceError {
        match self {
            Side::Client => SpliceError::Client(e),
            Side::Backend => SpliceError::Backend(e),
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

/// One direction: bytes read from one socket and not yet written to the other.
#[derive(Default)]
struct Pump {
    /// Empty, with no capacity, whenever the source has nothing to read.
    buf: Vec<u8>,
    /// How much of `buf` has been written.
    written: usize,
    /// The source ended and the destination's write half is shut down.
    finished: bool,
}

impl Pump {
    /// Moves bytes until the source or the destination would block (`Pending`, wakers set), the
    /// source ends (`Ready(Ok)`), or a socket fails.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        bytes: &AtomicU64,
        moved: &mut bool,
        from_side: Side,
    ) -> Poll<Result<(), SpliceError>> {
        loop {
            // 1. Write what is pending.
            while self.written < self.buf.len() {
                match to.try_write(self.buf.get(self.written..).unwrap_or_default()) {
                    Ok(0) => {
                        return Poll::Ready(Err(from_side
                            .other()
                            .err(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(n) => {
                        self.written += n;
                        *moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match to.poll_write_ready(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => {
                                return Poll::Ready(Err(from_side.other().err(e)))
                            }
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    Err(e) => return Poll::Ready(Err(from_side.other().err(e))),
                }
            }
            // 2. Read more, taking a buffer only once the source is readable.
            let filled = !self.buf.is_empty() && self.buf.len() == self.buf.capacity();
            self.buf.clear();
            self.written = 0;
            match from.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(from_side.err(e))),
                Poll::Pending => {
                    // Nothing to read: give the buffer back while idle.
                    self.buf = Vec::new();
                    return Poll::Pending;
                }
            }
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(FIRST_BUF_LEN);
            } else if filled && self.buf.capacity() < BUF_LEN {
                // A bulk transfer: fewer, larger reads from now on.
                self.buf = Vec::with_capacity(BUF_LEN);
            }
            match from.try_read_buf(&mut self.buf) {
                Ok(0) => {
                    // Half-close: tell the other side, keep the other direction going. Failure
                    // to shut down means the peer is gone; the other direction will see it.
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                    self.buf = Vec::new();
                    self.finished = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                    *moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(from_side.err(e))),
            }
        }
    }
}

pub(crate) async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
