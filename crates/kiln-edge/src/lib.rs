//! The Kiln edge proxy.
//!
//! This crate owns the path of every connection from the internet to an instance: accept, read the
//! TLS ClientHello's SNI without terminating TLS ([`sni`]), pick a healthy backend for that
//! hostname from the route table, connect to it over the overlay, prepend a PROXY protocol v2
//! header when the service asks for one ([`proxy_v2`]), and splice bytes both ways. The route table
//! comes from the control plane ([`Edge::follow`]) or a static file; the edge keeps serving its last
//! table while the control plane is away. It does not decide routes, terminate TLS or look inside
//! the encrypted stream.

pub mod proxy_v2;
pub mod sni;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use kiln_api::{Client, Route};

/// Edge settings.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub listen: Vec<SocketAddr>,
    /// How long a client has to send its whole ClientHello.
    pub hello_timeout: Duration,
    /// How long a backend has to accept a connection before the next one is tried.
    pub connect_timeout: Duration,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "127.0.0.1:8443".parse().expect("literal"),
                "[::1]:8443".parse().expect("literal"),
            ],
            hello_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// An edge failed to start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Why a client connection was not proxied. The side at fault decides what is counted and
/// whether a retry could help.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("client sent no complete ClientHello in time")]
    HelloTimeout,
    #[error("client I/O failed")]
    ClientIo(#[source] std::io::Error),
    #[error("client closed before its ClientHello was complete")]
    ClientClosed,
    #[error("client sent an unusable ClientHello")]
    BadHello(#[source] sni::HelloError),
    #[error("no route for server name {0:?}")]
    NoRoute(Option<String>),
    #[error("no backend of {hostname} accepted a connection")]
    NoBackend { hostname: String },
}

struct RouteEntry {
    route: Route,
    next: AtomicUsize,
}

/// The proxy and its current route table.
pub struct Edge {
    config: EdgeConfig,
    routes: RwLock<Arc<HashMap<String, Arc<RouteEntry>>>>,
    connections: AtomicU64,
    log_limiter: LogLimiter,
}

impl Edge {
    pub fn new(config: EdgeConfig) -> Arc<Edge> {
        Arc::new(Edge {
            config,
            routes: RwLock::new(Arc::new(HashMap::new())),
            connections: AtomicU64::new(0),
            log_limiter: LogLimiter::new(10),
        })
    }

    /// Replaces the route table. Live connections are untouched.
    pub fn set_routes(&self, routes: Vec<Route>) {
        let table: HashMap<String, Arc<RouteEntry>> = routes
            .into_iter()
            .map(|r| {
                (
                    r.hostname.to_ascii_lowercase(),
                    Arc::new(RouteEntry {
                        route: r,
                        next: AtomicUsize::new(0),
                    }),
                )
            })
            .collect();
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    fn lookup(&self, host: &str) -> Option<Arc<RouteEntry>> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .cloned()
    }

    /// Binds every configured listen address.
    pub async fn bind(&self) -> Result<Vec<TcpListener>, EdgeError> {
        let mut out = Vec::new();
        for addr in &self.config.listen {
            out.push(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| EdgeError::Bind {
                        addr: *addr,
                        source,
                    })?,
            );
        }
        Ok(out)
    }

    /// Accepts and proxies connections on `listeners` forever.
    pub async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>) {
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners {
            let edge = self.clone();
            tasks.spawn(async move { edge.accept_loop(l).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let edge = self.clone();
            tokio::spawn(async move {
                edge.connections.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = edge.handle(stream, peer).await {
                    if edge.log_limiter.allow() {
                        tracing::debug!(client = %peer, error = %e, "connection not proxied");
                    }
                }
            });
        }
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) -> Result<(), ConnError> {
        let _ = client.set_nodelay(true);
        let local = client.local_addr().map_err(ConnError::ClientIo)?;
        let (buf, hello) = tokio::time::timeout(self.config.hello_timeout, read_hello(&mut client))
            .await
            .map_err(|_| ConnError::HelloTimeout)??;
        let Some(entry) = hello.sni.as_deref().and_then(|h| self.lookup(h)) else {
            // Tell the client in TLS's own words, then close.
            let _ = client.write_all(&sni::unrecognized_name_alert()).await;
            return Err(ConnError::NoRoute(hello.sni));
        };
        let mut backend = self.connect(&entry).await?;
        let mut first = Vec::with_capacity(buf.len() + 64);
        if entry.route.proxy_protocol {
            let header = proxy_v2::ProxyHeader {
                source: peer,
                destination: local,
                authority: hello.sni.clone(),
                unique_id: Some(connection_id().to_vec()),
            };
            header.encode(&mut first);
        }
        first.extend_from_slice(&buf);
        // Header and buffered hello in one write, before any other client byte.
        backend
            .write_all(&first)
            .await
            .map_err(ConnError::ClientIo)?;
        drop(first);
        drop(buf);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
        Ok(())
    }

    /// Connects to one of the route's backends, round-robin, trying each at most once.
    async fn connect(&self, entry: &RouteEntry) -> Result<TcpStream, ConnError> {
        let n = entry.route.backends.len();
        let start = entry.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let addr = entry.route.backends[(start + i) % n];
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                _ => {
                    if self.log_limiter.allow() {
                        tracing::warn!(backend = %addr, hostname = %entry.route.hostname, "backend connect failed");
                    }
                }
            }
        }
        Err(ConnError::NoBackend {
            hostname: entry.route.hostname.clone(),
        })
    }

    /// Follows the control plane's route table forever, keeping the last one while it is away.
    pub async fn follow(self: Arc<Self>, client: Client) {
        let mut seq = 0;
        let mut backoff = Duration::from_millis(200);
        loop {
            match client.routes(seq, Duration::from_secs(25)).await {
                Ok(table) => {
                    backoff = Duration::from_millis(200);
                    if table.seq != seq || seq == 0 {
                        tracing::debug!(
                            seq = table.seq,
                            routes = table.routes.len(),
                            "route table updated"
                        );
                    }
                    seq = table.seq;
                    self.set_routes(table.routes);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch routes; keeping the last table");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Reads until the ClientHello is complete; returns the bytes read (to forward) and the hello.
async fn read_hello(client: &mut TcpStream) -> Result<(Vec<u8>, sni::ClientHello), ConnError> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        if buf.len() >= sni::MAX_HELLO_BYTES {
            return Err(ConnError::BadHello(sni::HelloError::TooLarge));
        }
        let want = (sni::MAX_HELLO_BYTES - buf.len()).min(16 * 1024);
        buf.reserve(want);
        let n = (&mut *client)
            .take(want as u64)
            .read_buf(&mut buf)
            .await
            .map_err(ConnError::ClientIo)?;
        if n == 0 {
            return Err(ConnError::ClientClosed);
        }
        match sni::parse_client_hello(&buf) {
            Ok(hello) => return Ok((buf, hello)),
            Err(sni::HelloError::NeedMore) => continue,
            Err(e) => return Err(ConnError::BadHello(e)),
        }
    }
}

/// 16 random bytes identifying a connection (PROXY v2 UNIQUE_ID TLV).
fn connection_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let _ = getrandom::fill(&mut id);
    id
}

/// Allows at most `per_sec` log lines a second for anything a client can trigger.
struct LogLimiter {
    per_sec: u64,
    window: AtomicU64,
    count: AtomicU64,
}

impl LogLimiter {
    fn new(per_sec: u64) -> Self {
        Self {
            per_sec,
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn allow(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) < self.per_sec
    }
}
