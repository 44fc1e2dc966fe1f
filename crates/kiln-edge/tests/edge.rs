//! The edge proxy end to end on loopback: real sockets, an in-process `Edge`, small backends that
//! tag their answers so a test can tell which one served a connection.
//!
//! One behaviour per test: routing by SNI, the PROXY v2 header (decoded here, and accepted by a
//! real HAProxy in `haproxy_accepts_the_header_and_sees_the_client`), balancing and limits,
//! retries and ejection, active health checks, timeouts, per-client limits, port routes added and
//! removed at runtime, route changes under live connections, drain, metrics, and a restart where
//! a second edge takes over a port with `SO_REUSEPORT` while connections keep flowing.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use kiln_api::{Concurrency, PortRoute, Route, RouteTable};
use kiln_edge::proxy_v2::{self, Decoded, ProxyHeader};
use kiln_edge::{Edge, EdgeConfig, HealthConfig};
use kiln_types::{AppName, ServiceProtocol};

// ---------------------------------------------------------------------------------------------
// Harness.

/// A minimal TLS 1.2-style ClientHello with `name` as SNI: enough for the edge's parser.
fn hello_for(name: &str) -> Vec<u8> {
    let n = name.as_bytes();
    let mut sni = Vec::new();
    sni.extend(u16::try_from(n.len() + 3).unwrap().to_be_bytes());
    sni.push(0);
    sni.extend(u16::try_from(n.len()).unwrap().to_be_bytes());
    sni.extend(n);
    let mut exts = vec![0, 0];
    exts.extend(u16::try_from(sni.len()).unwrap().to_be_bytes());
    exts.extend(sni);
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01, 1, 0]);
    body.extend(u16::try_from(exts.len()).unwrap().to_be_bytes());
    body.extend(exts);
    let len = u32::try_from(body.len()).unwrap().to_be_bytes();
    let mut msg = vec![1, len[1], len[2], len[3]];
    msg.extend(body);
    let mut rec = vec![22, 3, 1];
    rec.extend(u16::try_from(msg.len()).unwrap().to_be_bytes());
    rec.extend(msg);
    rec
}

/// A ClientHello without extensions, hence without SNI.
fn hello_without_sni() -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01, 1, 0]);
    let len = u32::try_from(body.len()).unwrap().to_be_bytes();
    let mut msg = vec![1, len[1], len[2], len[3]];
    msg.extend(body);
    let mut rec = vec![22, 3, 1];
    rec.extend(u16::try_from(msg.len()).unwrap().to_be_bytes());
    rec.extend(msg);
    rec
}

/// A backend that answers every connection with its one-byte tag, then echoes. With `proxy`, it
/// first decodes a PROXY v2 header and reports it (and the bytes of the header's read) on
/// `headers`.
struct TestBackend {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(tag: u8) -> TestBackend {
    backend_with(tag, None).await
}

async fn backend_with(tag: u8, headers: Option<mpsc::UnboundedSender<ProxyHeader>>) -> TestBackend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_backend(l, tag, headers)
}

fn serve_backend(
    l: TcpListener,
    tag: u8,
    headers: Option<mpsc::UnboundedSender<ProxyHeader>>,
) -> TestBackend {
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (o, a) = (open.clone(), accepted.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let (o, headers) = (o.clone(), headers.clone());
            tokio::spawn(async move {
                let mut rest = Vec::new();
                if let Some(headers) = headers {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            o.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        match proxy_v2::decode(&buf) {
                            Ok(Decoded::Proxy { header, consumed }) => {
                                rest = buf[consumed..].to_vec();
                                let _ = headers.send(header);
                                break;
                            }
                            Err(proxy_v2::ProxyError::NeedMore) => continue,
                            other => panic!("backend got no valid PROXY header: {other:?}"),
                        }
                    }
                }
                let _ = s.write_all(&[tag]).await;
                let _ = s.write_all(&rest).await;
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    TestBackend {
        addr,
        open,
        accepted,
        task,
    }
}

fn config() -> EdgeConfig {
    EdgeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        health: HealthConfig {
            interval: Duration::ZERO,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn route(host: &str, backends: &[SocketAddr]) -> Route {
    Route {
        hostname: host.into(),
        app: "app".parse::<AppName>().unwrap(),
        proxy_protocol: false,
        backends: backends.to_vec(),
        concurrency: None,
    }
}

fn table(routes: Vec<Route>) -> RouteTable {
    RouteTable {
        seq: 1,
        routes,
        ports: Vec::new(),
    }
}

/// Starts an edge serving `t`; returns it and its SNI listen address.
async fn start(config: EdgeConfig, t: RouteTable) -> (Arc<Edge>, SocketAddr) {
    let edge = Edge::new(config);
    edge.set_table(t);
    let listeners = edge.bind().await.unwrap();
    let addr = listeners[0].local_addr().unwrap();
    tokio::spawn(edge.clone().serve(listeners));
    (edge, addr)
}

/// Connects through the edge with `hello`; returns the stream after reading the backend's tag.
async fn open(edge: SocketAddr, hello: &[u8]) -> io::Result<(TcpStream, u8)> {
    let mut s = TcpStream::connect(edge).await?;
    s.write_all(hello).await?;
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).await?;
    // The backend echoes the hello: read it back, it proves the bytes arrived untouched.
    let mut echo = vec![0u8; hello.len()];
    s.read_exact(&mut echo).await?;
    assert_eq!(
        echo, hello,
        "the backend must receive the hello byte for byte"
    );
    Ok((s, tag[0]))
}

/// The value of one sample (`name{labels}` exactly as rendered) in the edge's metrics.
fn metric(edge: &Edge, sample: &str) -> f64 {
    let text = edge.render_metrics();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

/// Waits for a condition on state outside the test's control (health checks, timers in the
/// edge), failing after 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Expects the edge to close the connection without proxying it.
async fn expect_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("edge must close the connection")
        .ok();
    got
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Routing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_sni_and_forwards_the_hello_untouched() {
    let a = backend(b'a').await;
    let b = backend(b'b').await;
    let (_edge, addr) = start(
        config(),
        table(vec![
            route("a.kiln.test", &[a.addr]),
            route("B.Kiln.Test", &[b.addr]),
        ]),
    )
    .await;
    let (_s, tag) = open(addr, &hello_for("a.kiln.test")).await.unwrap();
    assert_eq!(tag, b'a');
    // Route hostnames are matched lowercased.
    let (mut s, tag) = open(addr, &hello_for("b.kiln.test")).await.unwrap();
    assert_eq!(tag, b'b');
    // After the hello, bytes flow both ways.
    s.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_route_takes_one_label_and_exact_names_win() {
    let w = backend(b'w').await;
    let e = backend(b'e').await;
    let (_edge, addr) = start(
        config(),
        table(vec![
            route("*.shop.test", &[w.addr]),
            route("exact.shop.test", &[e.addr]),
        ]),
    )
    .await;
    assert_eq!(open(addr, &hello_for("a.shop.test")).await.unwrap().1, b'w');
    assert_eq!(
        open(addr, &hello_for("exact.shop.test")).await.unwrap().1,
        b'e'
    );
    // One label only: neither the parent itself nor a deeper name.
    for name in ["shop.test", "a.b.shop.test", "shop", "a.shop.test.evil"] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&hello_for(name)).await.unwrap();
        let got = expect_closed(&mut s).await;
        assert_eq!(got, kiln_edge::sni::unrecognized_name_alert(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_sni_gets_an_unrecognized_name_alert() {
    let a = backend(b'a').await;
    let (edge, addr) = start(config(), table(vec![route("a.kiln.test", &[a.addr])])).await;
    for hello in [hello_for("nope.kiln.test"), hello_without_sni()] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let got = expect_closed(&mut s).await;
        assert_eq!(got, kiln_edge::sni::unrecognized_name_alert());
    }
    assert_eq!(a.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(
        metric(&edge, "kiln_edge_errors_total{reason=\"no_route\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_sni_goes_to_the_default_hostname() {
    let a = backend(b'a').await;
    let d = backend(b'd').await;
    let (_edge, addr) = start(
        EdgeConfig {
            default_hostname: Some("default.kiln.test".into()),
            ..config()
        },
        table(vec![
            route("a.kiln.test", &[a.addr]),
            route("default.kiln.test", &[d.addr]),
        ]),
    )
    .await;
    let (_s, tag) = open(addr, &hello_without_sni()).await.unwrap();
    assert_eq!(tag, b'd');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_tls_is_refused_at_once() {
    let a = backend(b'a').await;
    let (edge, addr) = start(config(), table(vec![route("a.kiln.test", &[a.addr])])).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(expect_closed(&mut s).await.is_empty());
    assert_eq!(
        metric(&edge, "kiln_edge_errors_total{reason=\"not_tls\"}"),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol v2.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_header_precedes_the_hello_with_client_address_and_sni() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = backend_with(b'a', Some(tx)).await;
    let mut r = route("a.kiln.test", &[a.addr]);
    r.proxy_protocol = true;
    let mut cfg = config();
    cfg.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    let edge = Edge::new(cfg);
    edge.set_table(table(vec![r]));
    let listeners = edge.bind().await.unwrap();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    tokio::spawn(edge.clone().serve(listeners));

    let mut ids = Vec::new();
    for edge_addr in addrs {
        let hello = hello_for("a.kiln.test");
        let mut s = TcpStream::connect(edge_addr).await.unwrap();
        let client = s.local_addr().unwrap();
        s.write_all(&hello).await.unwrap();
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).await.unwrap();
        // The backend echoed exactly the bytes after the header: the hello, untouched.
        let mut echo = vec![0u8; hello.len()];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, hello);
        let h = rx.recv().await.unwrap();
        assert_eq!(
            h.source, client,
            "IPv4 and IPv6 clients appear as themselves"
        );
        assert_eq!(h.destination, edge_addr);
        assert_eq!(h.authority.as_deref(), Some("a.kiln.test"));
        ids.push(h.unique_id.unwrap());
    }
    assert_eq!(ids[0].len(), 16);
    assert_ne!(ids[0], ids[1], "every connection gets its own UNIQUE_ID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_accepts_the_header_and_sees_the_client() {
    // A real consumer: HAProxy 2.6 terminates TLS behind the edge with `accept-proxy` and answers
    // with the client address, port and SNI it learned from the edge's PROXY v2 header.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let cert = dir.path().join("cert.pem");
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=app.kiln.test",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl must be installed (./scripts/install-deps)");
    assert!(st.success());
    let pem = dir.path().join("haproxy.pem");
    std::fs::write(
        &pem,
        [std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()].concat(),
    )
    .unwrap();
    let hport = free_port();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 5s\n  timeout server 5s\n\
             frontend fe\n  bind 127.0.0.1:{hport} accept-proxy ssl crt {pem}\n  \
             http-request return status 200 content-type text/plain lf-string \
             \"src=%[src] port=%[src_port] authority=%[fc_pp_authority] id=%[fc_pp_unique_id,hex]\"\n",
            pem = pem.display()
        ),
    )
    .unwrap();
    let mut haproxy = tokio::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy must be installed (./scripts/install-deps)");
    let haddr: SocketAddr = format!("127.0.0.1:{hport}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(haddr).await.is_err() {
        assert!(haproxy.try_wait().unwrap().is_none(), "haproxy exited");
        assert!(Instant::now() < deadline, "haproxy did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut r = route("app.kiln.test", &[haddr]);
    r.proxy_protocol = true;
    let mut cfg = config();
    cfg.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    let edge = Edge::new(cfg);
    edge.set_table(table(vec![r]));
    let listeners = edge.bind().await.unwrap();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    tokio::spawn(edge.clone().serve(listeners));

    for edge_addr in addrs {
        let ip = match edge_addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let port = edge_addr.port();
        let out = tokio::process::Command::new("curl")
            .args(["-sk", "--max-time", "10", "--resolve"])
            .arg(format!("app.kiln.test:{port}:{ip}"))
            .args(["-w", " local_port=%{local_port}"])
            .arg(format!("https://app.kiln.test:{port}/"))
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let fields: HashMap<&str, &str> = text
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let client_ip = match edge_addr {
            SocketAddr::V4(_) => "127.0.0.1",
            SocketAddr::V6(_) => "::1",
        };
        assert_eq!(fields.get("src"), Some(&client_ip), "haproxy said: {text}");
        assert_eq!(fields.get("port"), fields.get("local_port"), "{text}");
        assert_eq!(fields.get("authority"), Some(&"app.kiln.test"), "{text}");
        assert_eq!(fields.get("id").map(|id| id.len()), Some(32), "{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Balancing, limits, retries, health.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_spread_by_least_connections() {
    let a = backend(b'a').await;
    let b = backend(b'b').await;
    let (_edge, addr) = start(
        config(),
        table(vec![route("a.kiln.test", &[a.addr, b.addr])]),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(open(addr, &hello_for("a.kiln.test")).await.unwrap());
    }
    // With two backends, the power of two choices is exact least-connections: 10 and 10.
    assert_eq!(a.open.load(Ordering::SeqCst), 10);
    assert_eq!(b.open.load(Ordering::SeqCst), 10);
    // Close a's connections: the next ten all go to a.
    held.retain(|(_, tag)| *tag == b'b');
    eventually("backend a to see its connections close", || {
        a.open.load(Ordering::SeqCst) == 0
    })
    .await;
    // The edge's count drops when it sees the client close; wait for it through the backend.
    let mut tags = Vec::new();
    for _ in 0..10 {
        let (s, tag) = open(addr, &hello_for("a.kiln.test")).await.unwrap();
        tags.push(tag);
        held.push((s, tag));
    }
    assert!(tags.iter().all(|t| *t == b'a'), "{tags:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_limit_refuses_and_soft_limit_spills_over() {
    let a = backend(b'a').await;
    let b = backend(b'b').await;
    let mut r = route("a.kiln.test", &[a.addr, b.addr]);
    r.concurrency = Some(Concurrency {
        soft_limit: 1,
        hard_limit: 2,
    });
    let (edge, addr) = start(config(), table(vec![r])).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(open(addr, &hello_for("a.kiln.test")).await.unwrap());
    }
    assert_eq!(a.open.load(Ordering::SeqCst), 2);
    assert_eq!(b.open.load(Ordering::SeqCst), 2);
    // Both at the hard limit: refused, and neither backend sees a fifth connection.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello_for("a.kiln.test")).await.unwrap();
    assert!(expect_closed(&mut s).await.is_empty());
    assert_eq!(
        a.accepted.load(Ordering::SeqCst) + b.accepted.load(Ordering::SeqCst),
        4
    );
    assert_eq!(
        metric(&edge, "kiln_edge_errors_total{reason=\"service_full\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connect_is_retried_on_another_backend_and_ejects_it() {
    let live = backend(b'l').await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (edge, addr) = start(
        EdgeConfig {
            eject_base: Duration::from_secs(60),
            ..config()
        },
        table(vec![route("a.kiln.test", &[dead, live.addr])]),
    )
    .await;
    for _ in 0..20 {
        let (_s, tag) = open(addr, &hello_for("a.kiln.test")).await.unwrap();
        assert_eq!(tag, b'l');
    }
    // The dead backend was tried once at most: after its first refusal it is ejected.
    let failures = metric(&edge, "kiln_edge_backend_connect_failures_total");
    assert!(failures <= 1.0, "{failures}");
    assert_eq!(metric(&edge, "kiln_edge_connect_retries_total"), failures);
    if failures == 1.0 {
        assert_eq!(metric(&edge, "kiln_edge_backends{state=\"ejected\"}"), 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_accepting_closes_the_client() {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (edge, addr) = start(config(), table(vec![route("a.kiln.test", &[dead])])).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello_for("a.kiln.test")).await.unwrap();
    assert!(expect_closed(&mut s).await.is_empty());
    assert_eq!(
        metric(&edge, "kiln_edge_errors_total{reason=\"no_backend\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_a_backend_out_and_bring_it_back() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = l.local_addr().unwrap();
    let b = serve_backend(l, b'a', None);
    let (edge, _addr) = start(
        EdgeConfig {
            health: HealthConfig {
                interval: Duration::from_millis(20),
                timeout: Duration::from_millis(200),
                rise: 2,
                fall: 2,
            },
            ..config()
        },
        table(vec![route("a.kiln.test", &[baddr])]),
    )
    .await;
    eventually("checks to pass", || {
        metric(&edge, "kiln_edge_health_checks_total{result=\"pass\"}") >= 2.0
    })
    .await;
    assert_eq!(metric(&edge, "kiln_edge_backends{state=\"up\"}"), 1.0);
    // The backend stops listening: two failed checks take it out.
    drop(b);
    eventually("the backend to be down", || {
        metric(&edge, "kiln_edge_backends{state=\"down\"}") == 1.0
    })
    .await;
    assert!(metric(&edge, "kiln_edge_health_checks_total{result=\"fail\"}") >= 2.0);
    // It listens again: two passing checks bring it back.
    let l = TcpListener::bind(baddr).await.unwrap();
    let _b = serve_backend(l, b'a', None);
    eventually("the backend to be up again", || {
        metric(&edge, "kiln_edge_backends{state=\"up\"}") == 1.0
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Timeouts and per-client limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_hello_times_out() {
    let a = backend(b'a').await;
    let (edge, addr) = start(
        EdgeConfig {
            hello_timeout: Duration::from_millis(200),
            ..config()
        },
        table(vec![route("a.kiln.test", &[a.addr])]),
    )
    .await;
    let hello = hello_for("a.kiln.test");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello[..10]).await.unwrap();
    let started = Instant::now();
    assert!(expect_closed(&mut s).await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        metric(&edge, "kiln_edge_errors_total{reason=\"hello_timeout\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_busy_ones_are_not() {
    let a = backend(b'a').await;
    let (edge, addr) = start(
        EdgeConfig {
            idle_timeout: Duration::from_millis(400),
            ..config()
        },
        table(vec![route("a.kiln.test", &[a.addr])]),
    )
    .await;
    let (mut busy, _) = open(addr, &hello_for("a.kiln.test")).await.unwrap();
    let (mut idle, _) = open(addr, &hello_for("a.kiln.test")).await.unwrap();
    // Keep one connection busy for well over the idle timeout.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        busy.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        busy.read_exact(&mut b).await.unwrap();
    }
    assert!(expect_closed(&mut idle).await.is_empty());
    busy.write_all(b"y").await.unwrap();
    let mut b = [0u8; 1];
    busy.read_exact(&mut b).await.unwrap();
    assert_eq!(
        metric(&edge, "kiln_edge_errors_total{reason=\"idle_timeout\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_client_address_are_limited() {
    let a = backend(b'a').await;
    let (edge, addr) = start(
        EdgeConfig {
            max_connections_per_ip: 2,
            ..config()
        },
        table(vec![route("a.kiln.test", &[a.addr])]),
    )
    .await;
    let one = open(addr, &hello_for("a.kiln.test")).await.unwrap();
    let _two = open(addr, &hello_for("a.kiln.test")).await.unwrap();
    let mut three = TcpStream::connect(addr).await.unwrap();
    let _ = three.write_all(&hello_for("a.kiln.test")).await;
    assert!(expect_closed(&mut three).await.is_empty());
    assert_eq!(
        metric(&edge, "kiln_edge_errors_total{reason=\"client_ip_limit\"}"),
        1.0
    );
    // Closing one frees a slot.
    drop(one);
    eventually("the edge to see the close", || {
        metric(&edge, "kiln_edge_connections_active") == 1.0
    })
    .await;
    open(addr, &hello_for("a.kiln.test")).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Route table changes and port routes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_table_keeps_live_connections() {
    let a = backend(b'a').await;
    let b = backend(b'b').await;
    let (edge, addr) = start(config(), table(vec![route("x.kiln.test", &[a.addr])])).await;
    let (mut live, tag) = open(addr, &hello_for("x.kiln.test")).await.unwrap();
    assert_eq!(tag, b'a');
    edge.set_table(RouteTable {
        seq: 2,
        routes: vec![route("x.kiln.test", &[b.addr])],
        ports: Vec::new(),
    });
    let (_s, tag) = open(addr, &hello_for("x.kiln.test")).await.unwrap();
    assert_eq!(tag, b'b');
    live.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    live.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still here");
    assert_eq!(metric(&edge, "kiln_edge_route_table_seq"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_routes_open_and_close_at_runtime() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let db = backend_with(b'p', Some(tx)).await;
    let (edge, _addr) = start(config(), table(vec![])).await;
    // A second loopback address stands in for a dedicated IPv4.
    let listen: SocketAddr = format!("127.0.0.2:{}", free_port()).parse().unwrap();
    let port_table = |seq, ports| RouteTable {
        seq,
        routes: Vec::new(),
        ports,
    };
    edge.set_table(port_table(
        2,
        vec![PortRoute {
            listen,
            app: "db".parse::<AppName>().unwrap(),
            protocol: ServiceProtocol::Tcp,
            proxy_protocol: true,
            backends: vec![db.addr],
            concurrency: None,
        }],
    ));
    assert_eq!(edge.port_listeners(), vec![listen]);
    // Server speaks first: the client reads the backend's tag without sending anything.
    let mut s = TcpStream::connect(listen).await.unwrap();
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).await.unwrap();
    assert_eq!(tag[0], b'p');
    let h = rx.recv().await.unwrap();
    assert_eq!(h.source, s.local_addr().unwrap());
    assert_eq!(h.destination, listen);
    assert_eq!(h.authority, None);
    // Removing the route closes the listener; the open connection stays.
    edge.set_table(port_table(3, vec![]));
    assert!(edge.port_listeners().is_empty());
    eventually("the port to close", || {
        std::net::TcpStream::connect(listen).is_err()
    })
    .await;
    s.write_all(b"after").await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"after");
}

// ---------------------------------------------------------------------------------------------
// Drain and restart.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_accepting_and_waits_for_open_connections() {
    let a = backend(b'a').await;
    let (edge, addr) = start(config(), table(vec![route("a.kiln.test", &[a.addr])])).await;
    let (mut live, _) = open(addr, &hello_for("a.kiln.test")).await.unwrap();
    let drain = tokio::spawn({
        let edge = edge.clone();
        async move { edge.shutdown(Duration::from_secs(30)).await }
    });
    eventually("the listener to close", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(!drain.is_finished());
    live.write_all(b"ok").await.unwrap();
    let mut got = [0u8; 2];
    live.read_exact(&mut got).await.unwrap();
    drop(live);
    assert_eq!(drain.await.unwrap(), 0, "nothing left at the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_the_rest() {
    let a = backend(b'a').await;
    let (edge, addr) = start(config(), table(vec![route("a.kiln.test", &[a.addr])])).await;
    let (mut live, _) = open(addr, &hello_for("a.kiln.test")).await.unwrap();
    assert_eq!(edge.shutdown(Duration::from_millis(100)).await, 1);
    assert!(expect_closed(&mut live).await.is_empty());
    eventually("the connection to be counted", || {
        metric(&edge, "kiln_edge_errors_total{reason=\"drain_timeout\"}") == 1.0
    })
    .await;
}

/// Runs [`restart_inner`] in a network namespace of its own, where
/// `net.ipv4.tcp_migrate_req = 1` can be set without touching the machine's settings.
#[test]
fn restart_with_reuseport_drops_nothing() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("unshare")
        .args(["--net", "--", "sh", "-c"])
        .arg(
            "ip link set lo up && sysctl -qw net.ipv4.tcp_migrate_req=1 && \
             exec \"$0\" --exact restart_inner --ignored --nocapture --test-threads 1",
        )
        .arg(&exe)
        .env("KILN_EDGE_RESTART_INNER", "1")
        .output()
        .expect("unshare (util-linux) must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "inner test failed:\n{stdout}\n{stderr}"
    );
}

/// A second edge binds the first one's port (`SO_REUSEPORT`); the first drains. Clients keep
/// connecting throughout: none fails, and a connection opened through the first edge lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by restart_with_reuseport_drops_nothing inside its own network namespace"]
async fn restart_inner() {
    assert_eq!(
        std::env::var("KILN_EDGE_RESTART_INNER").as_deref(),
        Ok("1"),
        "run through restart_with_reuseport_drops_nothing"
    );
    let a = backend(b'a').await;
    let t = table(vec![route("a.kiln.test", &[a.addr])]);
    let (old, addr) = start(config(), t.clone()).await;
    let (mut live, _) = open(addr, &hello_for("a.kiln.test")).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let r = open(addr, &hello_for("a.kiln.test")).await;
                    assert!(r.is_ok(), "connection {n} failed: {:?}", r.err());
                    n += 1;
                }
                n
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let new = Edge::new(EdgeConfig {
        listen: vec![addr],
        ..config()
    });
    new.set_table(t);
    let listeners = new.bind().await.unwrap();
    tokio::spawn(new.clone().serve(listeners));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let drain = tokio::spawn({
        let old = old.clone();
        async move { old.shutdown(Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    assert!(total > 100, "only {total} connections");
    // The old edge still carries the connection it had.
    live.write_all(b"old").await.unwrap();
    let mut got = [0u8; 3];
    live.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"old");
    assert!(!drain.is_finished());
    drop(live);
    assert_eq!(drain.await.unwrap(), 0);
    assert!(metric(&new, "kiln_edge_connections_total") > 0.0);
    println!(
        "restart: {total} connections, old edge accepted {}, new edge {}",
        metric(&old, "kiln_edge_connections_total"),
        metric(&new, "kiln_edge_connections_total")
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_valid_prometheus_text() {
    let a = backend(b'a').await;
    let (edge, addr) = start(config(), table(vec![route("a.kiln.test", &[a.addr])])).await;
    let (mut s, _) = open(addr, &hello_for("a.kiln.test")).await.unwrap();
    s.write_all(b"12345").await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    drop(s);
    eventually("the connection to end", || edge.active_connections() == 0).await;

    let ml = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let maddr = ml.local_addr().unwrap();
    tokio::spawn(edge.clone().serve_metrics(ml));
    let mut c = TcpStream::connect(maddr).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).await.unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"));
    let sample = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(sample("kiln_edge_connections_total"), 1.0);
    assert_eq!(sample("kiln_edge_connections_proxied_total"), 1.0);
    let hello_len = hello_for("a.kiln.test").len() as f64;
    assert_eq!(
        sample("kiln_edge_bytes_total{direction=\"client_to_backend\"}"),
        hello_len + 5.0
    );
    // Tag, echoed hello, echoed payload.
    assert_eq!(
        sample("kiln_edge_bytes_total{direction=\"backend_to_client\"}"),
        1.0 + hello_len + 5.0
    );
    assert_eq!(sample("kiln_edge_hello_read_seconds_count"), 1.0);
    assert_eq!(
        sample("kiln_edge_hello_read_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );

    // Prometheus's own linter accepts the exposition.
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (./scripts/install-deps)");
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(body.as_bytes()).await.unwrap();
    drop(stdin);
    let out = promtool.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut c = TcpStream::connect(maddr).await.unwrap();
    c.write_all(b"GET /nope HTTP/1.1\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_address_is_not_served_by_shared_ports() {
    let shared_app = backend(b's').await;
    let dedicated_app = backend(b'd').await;
    let (edge, _addr) = start(config(), table(vec![])).await;
    let shared_port = free_port();
    let dedicated: SocketAddr = format!("127.0.0.3:{}", free_port()).parse().unwrap();
    let port_route = |listen: SocketAddr, app: &str, b: SocketAddr| PortRoute {
        listen,
        app: app.parse::<AppName>().unwrap(),
        protocol: ServiceProtocol::Tcp,
        proxy_protocol: false,
        backends: vec![b],
        concurrency: None,
    };
    edge.set_table(RouteTable {
        seq: 2,
        routes: Vec::new(),
        ports: vec![
            // A port of the shared addresses: every address of the edge.
            port_route(
                format!("0.0.0.0:{shared_port}").parse().unwrap(),
                "shared",
                shared_app.addr,
            ),
            port_route(dedicated, "dedicated", dedicated_app.addr),
        ],
    });
    let read_tag = |addr: SocketAddr| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut tag = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).await.is_ok() {
                tag.push(b[0]);
            }
        })
        .await
        .unwrap();
        tag
    };
    assert_eq!(read_tag(dedicated).await, b"d");
    assert_eq!(
        read_tag(format!("127.0.0.1:{shared_port}").parse().unwrap()).await,
        b"s"
    );
    // The shared port on the dedicated address belongs to the dedicated app, which does not
    // serve it: refused, not sent to the shared app.
    let on_dedicated: SocketAddr = format!("127.0.0.3:{shared_port}").parse().unwrap();
    assert!(read_tag(on_dedicated).await.is_empty());
    assert_eq!(shared_app.accepted.load(Ordering::SeqCst), 1);
}
