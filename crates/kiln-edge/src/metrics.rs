//! The edge's Prometheus metrics: counters and histograms kept in atomics on the connection path,
//! rendered in the text exposition format (version 0.0.4) on demand, and served by a minimal HTTP
//! endpoint ([`serve`]) on an operator-chosen address.
//!
//! Labels are fixed and few (error reason, direction, backend state): per-hostname series would
//! let a route table with thousands of apps blow up every scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Why a connection ended without being proxied, or ended badly. The label values are stable:
/// dashboards and alerts use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The client's address already has the maximum number of connections.
    ClientIpLimit,
    /// No complete ClientHello within the hello timeout.
    HelloTimeout,
    /// The client closed before its ClientHello was complete.
    ClientClosed,
    /// The first bytes were not a TLS handshake.
    NotTls,
    /// A TLS ClientHello that cannot be parsed or is too large.
    BadHello,
    /// No route for the server name (or no SNI and no default).
    NoRoute,
    /// Every backend of the service is at its hard limit.
    ServiceFull,
    /// No backend accepted a connection.
    NoBackend,
    /// Reading from or writing to the client failed.
    ClientIo,
    /// Reading from or writing to the backend failed.
    BackendIo,
    /// No byte in either direction for the idle timeout.
    IdleTimeout,
    /// Still open when the drain on shutdown ran out of time.
    DrainTimeout,
}

impl Reason {
    const ALL: [Reason; 12] = [
        Reason::ClientIpLimit,
        Reason::HelloTimeout,
        Reason::ClientClosed,
        Reason::NotTls,
        Reason::BadHello,
        Reason::NoRoute,
        Reason::ServiceFull,
        Reason::NoBackend,
        Reason::ClientIo,
        Reason::BackendIo,
        Reason::IdleTimeout,
        Reason::DrainTimeout,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::ClientIpLimit => "client_ip_limit",
            Reason::HelloTimeout => "hello_timeout",
            Reason::ClientClosed => "client_closed",
            Reason::NotTls => "not_tls",
            Reason::BadHello => "bad_hello",
            Reason::NoRoute => "no_route",
            Reason::ServiceFull => "service_full",
            Reason::NoBackend => "no_backend",
            Reason::ClientIo => "client_io",
            Reason::BackendIo => "backend_io",
            Reason::IdleTimeout => "idle_timeout",
            Reason::DrainTimeout => "drain_timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A histogram with fixed buckets (upper bounds in seconds).
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); one extra for +Inf.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

const HELLO_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0,
];

/// Every metric of one edge.
pub(crate) struct Metrics {
    pub(crate) accepted: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) proxied: AtomicU64,
    pub(crate) bytes_from_clients: AtomicU64,
    pub(crate) bytes_to_clients: AtomicU64,
    pub(crate) backend_connect_failures: AtomicU64,
    pub(crate) connect_retries: AtomicU64,
    pub(crate) health_checks_passed: AtomicU64,
    pub(crate) health_checks_failed: AtomicU64,
    pub(crate) route_table_seq: AtomicU64,
    pub(crate) port_bind_failures: AtomicU64,
    errors: Vec<AtomicU64>,
    pub(crate) hello_read: Histogram,
    pub(crate) backend_connect: Histogram,
}

/// Values computed at scrape time from the edge's state rather than counted.
pub(crate) struct Snapshot {
    pub(crate) routes: usize,
    pub(crate) port_routes: usize,
    pub(crate) backends_up: usize,
    pub(crate) backends_down: usize,
    pub(crate) backends_ejected: usize,
    pub(crate) draining: bool,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Metrics {
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            proxied: AtomicU64::new(0),
            bytes_from_clients: AtomicU64::new(0),
            bytes_to_clients: AtomicU64::new(0),
            backend_connect_failures: AtomicU64::new(0),
            connect_retries: AtomicU64::new(0),
            health_checks_passed: AtomicU64::new(0),
            health_checks_failed: AtomicU64::new(0),
            route_table_seq: AtomicU64::new(0),
            port_bind_failures: AtomicU64::new(0),
            errors: Reason::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            hello_read: Histogram::new(HELLO_BUCKETS),
            backend_connect: Histogram::new(CONNECT_BUCKETS),
        }
    }

    pub(crate) fn error(&self, reason: Reason) {
        if let Some(c) = self.errors.get(reason.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn errors(&self, reason: Reason) -> u64 {
        self.errors
            .get(reason.index())
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub(crate) fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "kiln_edge_connections_total",
            "Client connections accepted.",
            &self.accepted,
        );
        gauge(
            &mut out,
            "kiln_edge_connections_active",
            "Client connections open now.",
            self.active.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_edge_connections_proxied_total",
            "Client connections connected to a backend.",
            &self.proxied,
        );
        let _ = writeln!(
            out,
            "# HELP kiln_edge_bytes_total Bytes spliced, by direction.\n# TYPE kiln_edge_bytes_total counter"
        );
        let _ = writeln!(
            out,
            "kiln_edge_bytes_total{{direction=\"client_to_backend\"}} {}",
            self.bytes_from_clients.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "kiln_edge_bytes_total{{direction=\"backend_to_client\"}} {}",
            self.bytes_to_clients.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP kiln_edge_errors_total Connections refused or ended by a failure, by reason.\n# TYPE kiln_edge_errors_total counter"
        );
        for r in Reason::ALL {
            let _ = writeln!(
                out,
                "kiln_edge_errors_total{{reason=\"{}\"}} {}",
                r.label(),
                self.errors(r)
            );
        }
        counter(
            &mut out,
            "kiln_edge_backend_connect_failures_total",
            "Backend connect attempts that failed or timed out.",
            &self.backend_connect_failures,
        );
        counter(
            &mut out,
            "kiln_edge_connect_retries_total",
            "Connections retried on another backend after a failed connect.",
            &self.connect_retries,
        );
        let _ = writeln!(
            out,
            "# HELP kiln_edge_health_checks_total Active TCP health checks, by result.\n# TYPE kiln_edge_health_checks_total counter"
        );
        let _ = writeln!(
            out,
            "kiln_edge_health_checks_total{{result=\"pass\"}} {}",
            self.health_checks_passed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "kiln_edge_health_checks_total{{result=\"fail\"}} {}",
            self.health_checks_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP kiln_edge_backends Backends in the route table, by state.\n# TYPE kiln_edge_backends gauge"
        );
        for (state, v) in [
            ("up", snap.backends_up),
            ("down", snap.backends_down),
            ("ejected", snap.backends_ejected),
        ] {
            let _ = writeln!(out, "kiln_edge_backends{{state=\"{state}\"}} {v}");
        }
        gauge(
            &mut out,
            "kiln_edge_routes",
            "Hostnames in the route table.",
            snap.routes as u64,
        );
        gauge(
            &mut out,
            "kiln_edge_port_routes",
            "Port routes in the route table.",
            snap.port_routes as u64,
        );
        gauge(
            &mut out,
            "kiln_edge_route_table_seq",
            "Sequence number of the route table in use.",
            self.route_table_seq.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_edge_port_bind_failures_total",
            "Port routes whose address could not be listened on.",
            &self.port_bind_failures,
        );
        gauge(
            &mut out,
            "kiln_edge_draining",
            "1 while the edge drains for shutdown.",
            u64::from(snap.draining),
        );
        self.hello_read.render(
            &mut out,
            "kiln_edge_hello_read_seconds",
            "Time from accept to a complete ClientHello.",
        );
        self.backend_connect.render(
            &mut out,
            "kiln_edge_backend_connect_seconds",
            "Time to connect to the backend that took the connection.",
        );
        out
    }
}

/// Serves `GET /metrics` (any other path: 404) from `render` on `listener` forever.
///
/// A deliberately tiny HTTP/1.1 responder: one request per connection, the request head read
/// within 5 s and 8 KiB, then `Connection: close`. Enough for Prometheus and curl, and no HTTP
/// stack in the edge's dependency tree.
pub(crate) async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(chunk.get(..n).unwrap_or_default());
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let response = if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET / ") {
                let body = render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
