//! The Kiln edge proxy.
//!
//! This crate owns the path of every connection from the internet to an instance: accept, read the
//! TLS ClientHello's SNI without terminating TLS ([`sni`]) or take the service from the port the
//! client connected to, pick a backend (`balance`: power of two choices, least connections,
//! soft/hard limits, health), connect to it with retries, prepend a PROXY protocol v2 header when
//! the service asks for one ([`proxy_v2`]), and splice bytes both ways (`splice`) until either
//! side closes or the connection idles out. Around that path it owns the edge's own health checks
//! (`health`), per-client limits (`limits`), Prometheus metrics (`metrics`), listeners that
//! share their port with a successor process (`SO_REUSEPORT`, [`listen`]) and the drain on
//! shutdown.
//!
//! The route table comes from the control plane ([`Edge::follow`]) or a static file
//! ([`route_file`]); the edge keeps serving its last table while the control plane is away. The
//! edge does not decide routes or allocate ports (the control plane does), terminate TLS, or look
//! inside the encrypted stream.

mod balance;
mod health;
mod limits;
pub mod listen;
mod metrics;
pub mod proxy_v2;
pub mod route_file;
pub mod sni;
mod splice;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use kiln_api::{Client, Concurrency, Route, RouteTable};
use kiln_types::{AppName, ServiceProtocol};

use balance::{Backend, BackendGuard, PickError};
use limits::IpLimits;
use metrics::{Metrics, Reason};
use splice::{Direction, SpliceError};

pub use health::HealthConfig;

/// Edge settings.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Addresses where TLS is routed by SNI.
    pub listen: Vec<SocketAddr>,
    /// Listening sockets per address, sharing it with `SO_REUSEPORT`: the kernel spreads new
    /// connections over them, so accepts do not queue behind one socket.
    pub listeners_per_address: usize,
    /// How long a client has to send its whole ClientHello.
    pub hello_timeout: Duration,
    /// How long a backend has to accept a connection before the next one is tried.
    pub connect_timeout: Duration,
    /// Backends tried per connection before giving up (each at most once).
    pub connect_attempts: u32,
    /// A connection with no byte in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Hostname whose route takes TLS connections without SNI; `None` refuses them.
    pub default_hostname: Option<String>,
    /// Open connections allowed per client IPv4 address or IPv6 /64; 0 for no limit.
    pub max_connections_per_ip: u32,
    /// Active health checks of backends.
    pub health: HealthConfig,
    /// Passive ejection after a failed connect: `eject_base`, doubled per failure in a row, at most
    /// `eject_max`.
    pub eject_base: Duration,
    pub eject_max: Duration,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "127.0.0.1:8443".parse().expect("literal"),
                "[::1]:8443".parse().expect("literal"),
            ],
            listeners_per_address: 1,
            hello_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            connect_attempts: 3,
            idle_timeout: Duration::from_secs(3600),
            default_hostname: None,
            max_connections_per_ip: 1024,
            health: HealthConfig::default(),
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
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

/// Why a client connection was not proxied, or ended badly. Each variant names the side at
/// fault; [`ConnError::reason`] is the metrics label.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("client address is at its connection limit")]
    ClientIpLimit,
    #[error("client sent no complete ClientHello in time")]
    HelloTimeout,
    #[error("client I/O failed before the ClientHello was complete")]
    ClientIo(#[source] std::io::Error),
    #[error("client closed before its ClientHello was complete")]
    ClientClosed,
    #[error("client sent an unusable ClientHello")]
    BadHello(#[source] sni::HelloError),
    #[error("no route for server name {0:?}")]
    NoRoute(Option<String>),
    #[error("every backend of {service} is at its hard limit")]
    ServiceFull { service: String },
    #[error("no backend of {service} accepted a connection")]
    NoBackend { service: String },
    #[error("splicing {service} failed")]
    Splice {
        service: String,
        #[source]
        source: SpliceError,
    },
    #[error("connection still open when the drain ran out of time")]
    DrainTimeout,
}

impl ConnError {
    fn reason(&self) -> Reason {
        match self {
            ConnError::ClientIpLimit => Reason::ClientIpLimit,
            ConnError::HelloTimeout => Reason::HelloTimeout,
            ConnError::ClientIo(_) => Reason::ClientIo,
            ConnError::ClientClosed => Reason::ClientClosed,
            ConnError::BadHello(sni::HelloError::NotTls) => Reason::NotTls,
            ConnError::BadHello(_) => Reason::BadHello,
            ConnError::NoRoute(_) => Reason::NoRoute,
            ConnError::ServiceFull { .. } => Reason::ServiceFull,
            ConnError::NoBackend { .. } => Reason::NoBackend,
            ConnError::Splice { source, .. } => match source {
                SpliceError::Client(_) => Reason::ClientIo,
                SpliceError::Backend(_) => Reason::BackendIo,
                SpliceError::Idle(_) => Reason::IdleTimeout,
            },
            ConnError::DrainTimeout => Reason::DrainTimeout,
        }
    }
}

/// One service as the connection path sees it: where to send, and how.
#[derive(Debug)]
struct Service {
    /// Hostname or listen address, for logs.
    name: String,
    #[allow(dead_code)] // kept for logs and future per-app metrics
    app: AppName,
    proxy_protocol: bool,
    concurrency: Option<Concurrency>,
    backends: Vec<Arc<Backend>>,
}

/// The compiled route table. Replaced whole; connections keep the `Arc<Service>` they started with.
#[derive(Default)]
struct Table {
    seq: u64,
    hosts: HashMap<String, Arc<Service>>,
    ports: HashMap<SocketAddr, (ServiceProtocol, Arc<Service>)>,
    /// Addresses named by port routes (dedicated addresses): a wildcard port route never takes
    /// their connections, because an app with a dedicated address owns every port of it.
    dedicated: std::collections::HashSet<std::net::IpAddr>,
    /// Every backend of the table, once per address: health checks and metrics walk this.
    backends: HashMap<SocketAddr, Arc<Backend>>,
}

impl Table {
    /// The service of an SNI name: the exact name first, else the wildcard route of its parent
    /// (`*.example.com` takes `a.example.com`, never `a.b.example.com` nor `example.com`). The
    /// wildcard lookup allocates, but only for names without an exact route.
    fn lookup(&self, host: &str) -> Option<Arc<Service>> {
        if let Some(s) = self.hosts.get(host) {
            return Some(s.clone());
        }
        let (_, parent) = host.split_once('.')?;
        if parent.is_empty() {
            return None;
        }
        self.hosts.get(&format!("*.{parent}")).cloned()
    }
}

/// A listener of a port route.
struct PortListener {
    /// Dropping the sender stops the accept loop (its receiver sees the channel close).
    _stop: watch::Sender<bool>,
    /// Bound but not yet accepting (the edge is not serving yet).
    pending: Option<(std::net::TcpListener, watch::Receiver<bool>)>,
}

#[derive(Clone, Copy)]
enum ListenerKind {
    Sni,
    Port(SocketAddr),
}

/// The proxy and its current route table.
pub struct Edge {
    config: EdgeConfig,
    table: RwLock<Arc<Table>>,
    ports: Mutex<HashMap<SocketAddr, PortListener>>,
    metrics: Metrics,
    ip_limits: Arc<IpLimits>,
    log_limiter: LogLimiter,
    /// Origin of the edge's millisecond clock (ejections).
    epoch: Instant,
    /// `true` once `serve` runs: port listeners bound later start accepting at once.
    serving: AtomicBool,
    /// Set to `true` to stop every accept loop (drain).
    stop_accepting: watch::Sender<bool>,
    draining: AtomicBool,
    /// Notified when the last connection ends while draining.
    drained: Notify,
    /// Notified when the drain runs out of time: remaining connections close.
    force_close: Notify,
    force_closed: AtomicBool,
    /// First half of every PROXY v2 UNIQUE_ID: random per edge process.
    id_prefix: [u8; 8],
    id_counter: AtomicU64,
}

impl Edge {
    pub fn new(config: EdgeConfig) -> Arc<Edge> {
        let mut id_prefix = [0u8; 8];
        let _ = getrandom::fill(&mut id_prefix);
        Arc::new(Edge {
            ip_limits: IpLimits::new(config.max_connections_per_ip),
            config,
            table: RwLock::new(Arc::new(Table::default())),
            ports: Mutex::new(HashMap::new()),
            metrics: Metrics::new(),
            log_limiter: LogLimiter::new(10),
            epoch: Instant::now(),
            serving: AtomicBool::new(false),
            stop_accepting: watch::channel(false).0,
            draining: AtomicBool::new(false),
            drained: Notify::new(),
            force_close: Notify::new(),
            force_closed: AtomicBool::new(false),
            id_prefix,
            id_counter: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the SNI routes, keeping the port routes. Live connections are untouched.
    pub fn set_routes(self: &Arc<Self>, routes: Vec<Route>) {
        let current = self.table();
        let ports = current
            .ports
            .iter()
            .map(|(listen, (protocol, svc))| kiln_api::PortRoute {
                listen: *listen,
                app: svc.app.clone(),
                protocol: *protocol,
                proxy_protocol: svc.proxy_protocol,
                backends: svc.backends.iter().map(|b| b.addr).collect(),
                concurrency: svc.concurrency,
            })
            .collect();
        self.set_table(RouteTable {
            seq: current.seq,
            routes,
            ports,
        });
    }

    /// Replaces the whole route table. Live connections are untouched; backends that stay keep
    /// their connection counts and health; port listeners are opened and closed to match.
    pub fn set_table(self: &Arc<Self>, table: RouteTable) {
        let old = self.table();
        let mut backends: HashMap<SocketAddr, Arc<Backend>> = HashMap::new();
        let mut backend = |addr: SocketAddr| {
            backends
                .entry(addr)
                .or_insert_with(|| {
                    old.backends
                        .get(&addr)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Backend::new(addr)))
                })
                .clone()
        };
        let mut hosts = HashMap::new();
        for r in table.routes {
            let svc = Service {
                name: r.hostname.to_ascii_lowercase(),
                app: r.app,
                proxy_protocol: r.proxy_protocol,
                concurrency: r.concurrency,
                backends: r.backends.into_iter().map(&mut backend).collect(),
            };
            hosts.insert(svc.name.clone(), Arc::new(svc));
        }
        let mut ports = HashMap::new();
        for p in table.ports {
            let svc = Service {
                name: p.listen.to_string(),
                app: p.app,
                proxy_protocol: p.proxy_protocol,
                concurrency: p.concurrency,
                backends: p.backends.into_iter().map(&mut backend).collect(),
            };
            ports.insert(p.listen, (p.protocol, Arc::new(svc)));
        }
        let dedicated = ports
            .keys()
            .map(SocketAddr::ip)
            .filter(|ip| !ip.is_unspecified())
            .collect();
        let new = Arc::new(Table {
            seq: table.seq,
            hosts,
            ports,
            dedicated,
            backends,
        });
        self.metrics
            .route_table_seq
            .store(table.seq, Ordering::Relaxed);
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
        self.reconcile_ports(&new);
    }

    /// Opens listeners for new port routes and closes those of removed ones. A port that cannot
    /// be bound is counted and tried again with the next table.
    fn reconcile_ports(self: &Arc<Self>, table: &Table) {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.retain(|addr, _| table.ports.contains_key(addr));
        for addr in table.ports.keys() {
            if ports.contains_key(addr) || self.draining.load(Ordering::Relaxed) {
                continue;
            }
            match listen::bind(*addr, true) {
                Ok(l) => {
                    let (tx, rx) = watch::channel(false);
                    ports.insert(
                        *addr,
                        PortListener {
                            _stop: tx,
                            pending: Some((l, rx)),
                        },
                    );
                }
                Err(e) => {
                    self.metrics
                        .port_bind_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(listen = %addr, error = %e, "cannot listen for a port route");
                }
            }
        }
        if self.serving.load(Ordering::Acquire) {
            self.start_pending_ports(&mut ports);
        }
    }

    fn start_pending_ports(self: &Arc<Self>, ports: &mut HashMap<SocketAddr, PortListener>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let _guard = handle.enter();
        for (addr, p) in ports.iter_mut() {
            let Some((l, stop)) = p.pending.take() else {
                continue;
            };
            match TcpListener::from_std(l) {
                Ok(l) => {
                    let edge = self.clone();
                    let addr = *addr;
                    handle.spawn(async move {
                        edge.accept_loop(l, ListenerKind::Port(addr), Some(stop))
                            .await
                    });
                }
                Err(e) => {
                    tracing::warn!(listen = %addr, error = %e, "cannot register a port listener")
                }
            }
        }
    }

    /// Addresses of the port routes that are listening now.
    pub fn port_listeners(&self) -> Vec<SocketAddr> {
        let mut v: Vec<_> = self
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort();
        v
    }

    /// Binds every configured SNI listen address (`listeners_per_address` sockets each, with
    /// `SO_REUSEPORT`, so a new edge process can bind them while this one drains).
    pub async fn bind(&self) -> Result<Vec<TcpListener>, EdgeError> {
        let mut out = Vec::new();
        for addr in &self.config.listen {
            let mut addr = *addr;
            for _ in 0..self.config.listeners_per_address.max(1) {
                let l = listen::bind(addr, false)
                    .and_then(TcpListener::from_std)
                    .map_err(|source| EdgeError::Bind { addr, source })?;
                // Port 0: the further sockets join the port the first one got.
                addr = l.local_addr().unwrap_or(addr);
                out.push(l);
            }
        }
        Ok(out)
    }

    /// Accepts and proxies connections on `listeners` (SNI routing) and on the port routes, and
    /// runs the health checks, until [`Edge::shutdown`] stops accepting.
    pub async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>) {
        self.serving.store(true, Ordering::Release);
        {
            let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
            self.start_pending_ports(&mut ports);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners {
            let edge = self.clone();
            tasks.spawn(async move { edge.accept_loop(l, ListenerKind::Sni, None).await });
        }
        let health = tokio::spawn(health::run(self.clone()));
        while tasks.join_next().await.is_some() {}
        health.abort();
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        kind: ListenerKind,
        stop: Option<watch::Receiver<bool>>,
    ) {
        let mut global = self.stop_accepting.subscribe();
        let mut stop = stop;
        loop {
            let own_stop = async {
                match stop.as_mut() {
                    Some(rx) => {
                        let _ = rx.wait_for(|v| *v).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let accepted = tokio::select! {
                biased;
                _ = global.wait_for(|v| *v) => break,
                () = own_stop => break,
                r = listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    if self.log_limiter.allow() {
                        tracing::warn!(error = %e, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
            self.metrics.active.fetch_add(1, Ordering::Relaxed);
            let edge = self.clone();
            tokio::spawn(async move {
                let result = edge.run_connection(stream, peer, kind).await;
                if let Err(e) = result {
                    edge.metrics.error(e.reason());
                    if edge.log_limiter.allow() {
                        tracing::debug!(client = %peer, error = %e, "connection not proxied or ended badly");
                    }
                }
                let left = edge.metrics.active.fetch_sub(1, Ordering::AcqRel) - 1;
                if left == 0 && edge.draining.load(Ordering::Acquire) {
                    edge.drained.notify_one();
                }
            });
        }
    }

    async fn run_connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        kind: ListenerKind,
    ) -> Result<(), ConnError> {
        let forced = self.force_close.notified();
        if self.force_closed.load(Ordering::Acquire) {
            return Err(ConnError::DrainTimeout);
        }
        let work = async {
            let Some(_ip) = self.ip_limits.acquire(peer.ip()) else {
                return Err(ConnError::ClientIpLimit);
            };
            match kind {
                ListenerKind::Sni => self.handle_sni(stream, peer).await,
                ListenerKind::Port(addr) => self.handle_port(stream, peer, addr).await,
            }
        };
        tokio::select! {
            r = work => r,
            () = forced => Err(ConnError::DrainTimeout),
        }
    }

    async fn handle_sni(&self, mut client: TcpStream, peer: SocketAddr) -> Result<(), ConnError> {
        let _ = client.set_nodelay(true);
        let started = Instant::now();
        // Boxed, like the connect below: the states of the short phases live on the heap only
        // while they run, so the task of a long-lived connection is as small as its splice.
        let (buf, hello) = Box::pin(tokio::time::timeout(
            self.config.hello_timeout,
            read_hello(&mut client),
        ))
        .await
        .map_err(|_| ConnError::HelloTimeout)??;
        self.metrics.hello_read.observe(started.elapsed());
        let service = {
            let table = self.table();
            match hello
                .sni
                .as_deref()
                .or(self.config.default_hostname.as_deref())
            {
                Some(host) => table.lookup(host),
                None => None,
            }
        };
        // Keep only the name: nothing else of the hello may live as long as the connection.
        let sni = std::convert::identity(hello).sni;
        let Some(service) = service else {
            // Tell the client in TLS's own words, then close.
            let _ = splice::write_all(&client, &sni::unrecognized_name_alert()).await;
            return Err(ConnError::NoRoute(sni));
        };
        self.proxy(client, peer, &service, buf, sni).await
    }

    async fn handle_port(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        listen: SocketAddr,
    ) -> Result<(), ConnError> {
        let _ = client.set_nodelay(true);
        let table = self.table();
        let Some((_, service)) = table.ports.get(&listen).cloned() else {
            return Err(ConnError::NoRoute(None));
        };
        if listen.ip().is_unspecified() && !table.dedicated.is_empty() {
            let local = client.local_addr().map_err(ConnError::ClientIo)?;
            if table.dedicated.contains(&local.ip().to_canonical()) {
                return Err(ConnError::NoRoute(None));
            }
        }
        drop(table);
        // Nothing is read first: server-speaks-first protocols (SMTP, MySQL...) must work.
        self.proxy(client, peer, &service, Vec::new(), None).await
    }

    /// Connects to a backend of `service`, sends the PROXY header (if asked) and `first` (the
    /// bytes already read from the client) in one write, then splices.
    async fn proxy(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        service: &Service,
        first: Vec<u8>,
        authority: Option<String>,
    ) -> Result<(), ConnError> {
        let (backend, _guard) = Box::pin(self.connect(service)).await?;
        self.metrics.proxied.fetch_add(1, Ordering::Relaxed);
        let mut out = first;
        if service.proxy_protocol {
            let local = client.local_addr().map_err(ConnError::ClientIo)?;
            let header = proxy_v2::ProxyHeader {
                source: peer,
                destination: local,
                authority,
                unique_id: Some(self.connection_id().to_vec()),
            };
            let mut framed = Vec::with_capacity(header.encoded_len() + out.len());
            header.encode(&mut framed);
            framed.extend_from_slice(&out);
            out = framed;
        }
        if !out.is_empty() {
            Box::pin(splice::write_all(&backend, &out))
                .await
                .map_err(|e| ConnError::Splice {
                    service: service.name.clone(),
                    source: SpliceError::Backend(e),
                })?;
            self.metrics
                .bytes_from_clients
                .fetch_add(out.len() as u64, Ordering::Relaxed);
        }
        drop(out);
        splice::splice(
            &client,
            &backend,
            self.config.idle_timeout,
            Direction {
                bytes: &self.metrics.bytes_from_clients,
            },
            Direction {
                bytes: &self.metrics.bytes_to_clients,
            },
        )
        .await
        .map_err(|source| ConnError::Splice {
            service: service.name.clone(),
            source,
        })
    }

    /// Connects to a backend of `service`: picked by [`balance::pick`], retried on another backend
    /// when a connect fails (nothing has been sent yet, so a retry is always safe), each failure
    /// ejecting its backend for a while.
    async fn connect(&self, service: &Service) -> Result<(TcpStream, BackendGuard), ConnError> {
        let mut tried: Vec<usize> = Vec::new();
        let mut full = false;
        for attempt in 0..self.config.connect_attempts.max(1) {
            let guard = match balance::pick(
                &service.backends,
                service.concurrency,
                &tried,
                self.now_ms(),
            ) {
                Ok(g) => g,
                Err(PickError::Full) => {
                    full = true;
                    break;
                }
                Err(PickError::NoBackend) => break,
            };
            if attempt > 0 {
                self.metrics.connect_retries.fetch_add(1, Ordering::Relaxed);
            }
            let addr = guard.backend.addr;
            let started = Instant::now();
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => {
                    self.metrics.backend_connect.observe(started.elapsed());
                    guard.backend.connect_succeeded();
                    let _ = s.set_nodelay(true);
                    return Ok((s, guard));
                }
                result => {
                    self.metrics
                        .backend_connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    guard.backend.connect_failed(
                        self.now_ms(),
                        self.config.eject_base,
                        self.config.eject_max,
                    );
                    if self.log_limiter.allow() {
                        let error = match result {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        tracing::warn!(backend = %addr, service = %service.name, error, "backend connect failed");
                    }
                    if let Some(i) = service
                        .backends
                        .iter()
                        .position(|b| Arc::ptr_eq(b, &guard.backend))
                    {
                        tried.push(i);
                    }
                }
            }
        }
        if full {
            Err(ConnError::ServiceFull {
                service: service.name.clone(),
            })
        } else {
            Err(ConnError::NoBackend {
                service: service.name.clone(),
            })
        }
    }

    /// 16 bytes naming a connection (PROXY v2 UNIQUE_ID): a random per-process prefix and a
    /// counter, unique without a system call per connection.
    fn connection_id(&self) -> [u8; 16] {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 16];
        let (a, b) = id.split_at_mut(8);
        a.copy_from_slice(&self.id_prefix);
        b.copy_from_slice(&n.to_be_bytes());
        id
    }

    /// Stops accepting (listeners close, so a successor bound to the same ports with
    /// `SO_REUSEPORT` gets every new connection), waits up to `drain` for open connections to
    /// end, then closes the rest. Returns how many were still open at the deadline.
    pub async fn shutdown(&self, drain: Duration) -> u64 {
        self.draining.store(true, Ordering::Release);
        self.stop_accepting.send_replace(true);
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let deadline = tokio::time::Instant::now() + drain;
        loop {
            let active = self.metrics.active.load(Ordering::Acquire);
            if active == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, self.drained.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        let remaining = self.metrics.active.load(Ordering::Acquire);
        self.force_closed.store(true, Ordering::Release);
        self.force_close.notify_waiters();
        remaining
    }

    /// Connections open now.
    pub fn active_connections(&self) -> u64 {
        self.metrics.active.load(Ordering::Relaxed)
    }

    /// The metrics in Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let table = self.table();
        let now = self.now_ms();
        let mut snap = metrics::Snapshot {
            routes: table.hosts.len(),
            port_routes: table.ports.len(),
            backends_up: 0,
            backends_down: 0,
            backends_ejected: 0,
            draining: self.draining.load(Ordering::Relaxed),
        };
        for b in table.backends.values() {
            if !b.is_up() {
                snap.backends_down += 1;
            } else if b.is_ejected(now) {
                snap.backends_ejected += 1;
            } else {
                snap.backends_up += 1;
            }
        }
        self.metrics.render(&snap)
    }

    /// Serves the metrics (`GET /metrics`) on `listener` forever.
    pub async fn serve_metrics(self: Arc<Self>, listener: TcpListener) {
        let edge = self.clone();
        metrics::serve(listener, Arc::new(move || edge.render_metrics())).await
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
                            ports = table.ports.len(),
                            "route table updated"
                        );
                    }
                    seq = table.seq;
                    self.set_table(table);
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
    // Most hellos fit in 4 KiB (a post-quantum one is about 2 KiB); larger ones double the buffer
    // up to the bound, so thousands of clients in their handshake do not each pin 64 KiB.
    let mut buf = Vec::with_capacity(4096);
    loop {
        if buf.len() >= sni::MAX_HELLO_BYTES {
            return Err(ConnError::BadHello(sni::HelloError::TooLarge));
        }
        if buf.len() == buf.capacity() {
            buf.reserve(buf.capacity().min(sni::MAX_HELLO_BYTES - buf.len()));
        }
        let want = (sni::MAX_HELLO_BYTES - buf.len()).min(buf.capacity() - buf.len());
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

/// Allows at most `per_sec` log lines a second for anything a client or tenant can trigger.
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

#[cfg(test)]
mod tests {
    /// The task of a connection is most of what an idle connection costs (measured by
    /// `./scripts/bench edge`); a future that grows past this bound is a regression to look at.
    #[tokio::test]
    async fn connection_task_stays_small() {
        let edge = super::Edge::new(super::EdgeConfig::default());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let peer = c.local_addr().unwrap();
        let f = edge.run_connection(c, peer, super::ListenerKind::Sni);
        let size = std::mem::size_of_val(&f);
        assert!(size <= 1600, "a connection's future takes {size} bytes");
    }
}
