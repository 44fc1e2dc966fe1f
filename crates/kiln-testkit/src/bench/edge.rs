//! `./scripts/bench edge`: the Kiln edge (`kilnd edge`) against HAProxy 2.6 in `mode tcp` with
//! `req.ssl_sni` and `send-proxy-v2`, side by side in one run, with the same backends, the same
//! load generator and the same number of proxy threads.
//!
//! Setup: two backend processes (this binary re-run as `kiln-bench edge --backend`: tokio + rustls,
//! TLS 1.3, ECDSA P-256, no session tickets or resumption, so every connection is a full
//! handshake; each strips the PROXY v2 header, then answers a request for N bytes with N bytes).
//! Both proxies route the SNI `bench.kiln.test` to both backends with a PROXY v2 header (Kiln:
//! AUTHORITY and UNIQUE_ID TLVs; HAProxy: UNIQUE_ID TLV); HAProxy balances `leastconn`, Kiln by
//! power-of-two-choices least connections. Neither runs health checks. The load generator runs
//! in this process (tokio + rustls, resumption disabled).
//!
//! Phases, each alternating between the proxies round by round (and the order inside a round)
//! so that drift on the machine hits both alike; medians are reported:
//! 1. **Latency**: sequential full connections (TCP connect + TLS handshake + 64-byte request and
//!    answer), p50/p99, also straight to a backend: the difference is the latency a proxy adds.
//! 2. **Connection rate**: 64 concurrent clients opening full connections, in short slices that
//!    alternate between the proxies in ABBA order: connections/s over all slices, loaded p50/p99,
//!    and the proxy's CPU time per connection (from /proc).
//! 3. **Throughput**: one connection downloading 1 GiB.
//! 4. **Memory**: 10,000 connections opened (handshake + one request) and left idle; the proxy's
//!    resident memory (VmRSS) before and with them. Where the open-files limit cannot be raised
//!    to fit 20,000 descriptors in one proxy (these machines: 20,000, no CAP_SYS_RESOURCE), as many
//!    as fit, rounded down to a hundred: `idle_connections=` says how many.
//!
//! The figures end in `key=value` lines, the last one `edge_vs_haproxy_conn_rate=<ratio>`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SNI: &str = "bench.kiln.test";
/// The idle connections wanted; fewer when the open-files limit cannot fit them (a proxy needs
/// two descriptors per connection, and these machines cap every process at 20,000 without
/// CAP_SYS_RESOURCE to raise it).
const IDLE_CONNECTIONS_WANTED: usize = 10_000;
const RATE_CONCURRENCY: usize = 64;
const LARGE_TRANSFER: u64 = 1 << 30;
const SMALL_ANSWER: u64 = 64;

/// Entry point of `kiln-bench edge [--backend ...]`.
pub async fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    if args.first().map(String::as_str) == Some("--backend") {
        return backend_main(&args[1..]).await;
    }
    bench().await
}

// ---------------------------------------------------------------------------------------------
// Backend process.

async fn backend_main(args: &[String]) -> Result<()> {
    let [cert, key] = args else {
        bail!("usage: kiln-bench edge --backend CERT.der KEY.der");
    };
    let cert = CertificateDer::from(std::fs::read(cert)?);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(std::fs::read(key)?));
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    // Full handshakes only: no tickets, no session cache.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await?;
    println!("backend {}", l.local_addr()?);
    loop {
        let (tcp, _) = l.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = serve_backend_conn(acceptor, tcp).await;
        });
    }
}

async fn serve_backend_conn(
    acceptor: tokio_rustls::TlsAcceptor,
    mut tcp: TcpStream,
) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    // Skip a PROXY v2 header when there is one (the direct baseline sends none).
    let mut first = [0u8; 16];
    if tcp.peek(&mut first[..1]).await? == 1 && first[0] == b'\r' {
        tcp.read_exact(&mut first).await?;
        if first[..12] != *b"\r\n\r\n\0\r\nQUIT\n" {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let len = u16::from_be_bytes([first[14], first[15]]);
        let mut rest = vec![0u8; usize::from(len)];
        tcp.read_exact(&mut rest).await?;
    }
    let mut tls = acceptor.accept(tcp).await?;
    let mut req = [0u8; 8];
    tls.read_exact(&mut req).await?;
    let mut left = u64::from_be_bytes(req);
    let chunk = vec![0x5au8; 256 * 1024];
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        tls.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    tls.flush().await?;
    // Stay until the client closes: idle connections stay open on both sides.
    let mut sink = [0u8; 64];
    while tls.read(&mut sink).await? > 0 {}
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// TLS client.

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the bench's self-signed certificate but still verifies the handshake signature, so a
/// handshake costs what a real one does.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Result<Arc<ClientConfig>> {
    let p = provider();
    let mut c = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(p)))
        .with_no_client_auth();
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects, handshakes, asks for `n` bytes and reads them; returns the open stream.
async fn request(addr: SocketAddr, cfg: &Arc<ClientConfig>, n: u64) -> Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(SNI)?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await?;
    tls.write_all(&n.to_be_bytes()).await?;
    let mut left = n;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let got = tls.read(&mut buf).await?;
        ensure!(got > 0, "backend closed with {left} bytes to go");
        left = left.saturating_sub(got as u64);
    }
    Ok(tls)
}

/// One full connection; returns its latency (connect to last answer byte).
async fn one_connection(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Result<Duration> {
    let start = Instant::now();
    let tls = request(addr, cfg, SMALL_ANSWER).await?;
    let d = start.elapsed();
    drop(tls);
    Ok(d)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// User + system CPU time of a process, from /proc/PID/stat (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads stdout lines of `child` until one starts with `prefix`; returns the rest of that line.
fn wait_line(child: &mut Child, prefix: &str) -> Result<String> {
    let out = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(out).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.strip_prefix(prefix) {
            let rest = rest.trim().to_owned();
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Ok(rest);
        }
    }
    bail!("process exited before printing {prefix:?}")
}

async fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(addr).await.is_err() {
        ensure!(Instant::now() < deadline, "{addr} never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn build_kilnd() -> Result<PathBuf> {
    let root = crate::dev::workspace_root();
    let release = crate::dev::release();
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "-q", "-p", "kilnd"]).current_dir(&root);
    if release {
        cmd.arg("--release");
    }
    crate::example::clear_test_env(&mut cmd);
    ensure!(
        cmd.status().context("cannot run cargo")?.success(),
        "cargo build -p kilnd failed"
    );
    Ok(crate::dev::target_dir()
        .join(if release { "release" } else { "debug" })
        .join("kilnd"))
}

fn start_kiln_edge(
    kilnd: &Path,
    dir: &Path,
    backends: &[SocketAddr],
    threads: usize,
) -> Result<(Proc, SocketAddr)> {
    let routes = dir.join("routes.json");
    let table = serde_json::json!({
        "seq": 1,
        "routes": [{
            "hostname": SNI,
            "app": "bench",
            "proxy_protocol": true,
            "backends": backends,
        }],
    });
    std::fs::write(&routes, serde_json::to_vec_pretty(&table)?)?;
    let mut child = Command::new(kilnd)
        .arg("edge")
        .arg("--routes")
        .arg(&routes)
        .args(["--listen", "127.0.0.1:0"])
        .args(["--listeners-per-address", &threads.to_string()])
        .args(["--max-connections-per-ip", "0", "--health-interval-ms", "0"])
        .env("TOKIO_WORKER_THREADS", threads.to_string())
        .env("KILN_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start kilnd edge")?;
    let listen = wait_line(&mut child, "kilnd edge: listen ")?;
    let addr: SocketAddr = listen
        .split_whitespace()
        .next()
        .context("no listen address")?
        .parse()?;
    Ok((
        Proc {
            child,
            name: "edge",
        },
        addr,
    ))
}

fn start_haproxy(
    dir: &Path,
    backends: &[SocketAddr],
    threads: usize,
    maxconn: u64,
) -> Result<(Proc, SocketAddr)> {
    let port = free_port()?;
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server s{i} {b} send-proxy-v2 proxy-v2-options unique-id\n"))
        .collect();
    let cfg = format!(
        "global\n  nbthread {threads}\n  maxconn {maxconn}\n\
         defaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 3s\n  timeout client 1h\n  timeout server 1h\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  tcp-request inspect-delay 10s\n  \
         tcp-request content accept if {{ req.ssl_hello_type 1 }}\n  \
         unique-id-format %{{+X}}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid\n  \
         use_backend be if {{ req.ssl_sni -i {SNI} }}\n\
         backend be\n  balance leastconn\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()
        .context("haproxy is not installed (./scripts/install-deps)")?;
    ensure!(
        check.status.success(),
        "haproxy rejects the config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((
        Proc {
            child,
            name: "haproxy",
        },
        format!("127.0.0.1:{port}").parse()?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Phases.

struct Rate {
    count: usize,
    elapsed: f64,
    latencies: Vec<Duration>,
    /// CPU time the proxy used meanwhile.
    cpu: Duration,
    errors: usize,
}

async fn latency(addr: SocketAddr, cfg: &Arc<ClientConfig>, n: usize) -> Result<Vec<Duration>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(one_connection(addr, cfg).await?);
    }
    v.sort();
    Ok(v)
}

async fn rate(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    secs: f64,
    pid: Option<u32>,
) -> Result<Rate> {
    let cpu_before = pid.map(cpu_time).transpose()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..RATE_CONCURRENCY {
        let cfg = cfg.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < deadline {
                match one_connection(addr, &cfg).await {
                    Ok(d) => lat.push(d),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (lat, e) = r?;
        all.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_after = pid.map(cpu_time).transpose()?;
    Ok(Rate {
        count: all.len(),
        elapsed,
        latencies: all,
        cpu: match (cpu_before, cpu_after) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => Duration::ZERO,
        },
        errors,
    })
}

async fn throughput(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Result<f64> {
    let start = Instant::now();
    let tls = request(addr, cfg, LARGE_TRANSFER).await?;
    let secs = start.elapsed().as_secs_f64();
    drop(tls);
    Ok(LARGE_TRANSFER as f64 / (1024.0 * 1024.0) / secs)
}

/// Opens `count` connections (rounded down to a multiple of 100) through `addr`; returns the proxy's RSS before and with
/// them (KiB).
async fn idle_memory(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    pid: u32,
    count: usize,
) -> Result<(u64, u64)> {
    let before = rss_kib(pid)?;
    let mut open = Vec::with_capacity(count);
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = count / 100;
    for _ in 0..100 {
        let cfg = cfg.clone();
        tasks.spawn(async move {
            let mut mine = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                mine.push(request(addr, &cfg, 1).await?);
            }
            Ok::<_, anyhow::Error>(mine)
        });
    }
    while let Some(r) = tasks.join_next().await {
        open.extend(r??);
    }
    ensure!(open.len() == per_task * 100);
    // Let the proxy settle (buffers of the handshakes released) before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with = rss_kib(pid)?;
    drop(open);
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((before, with))
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Raises this process's open-files limit (inherited by the proxies and backends) as far as
/// allowed; returns the limit in force.
fn raise_fd_limit() -> Result<u64> {
    let _ = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg("--nofile=262144:262144")
        .stderr(Stdio::null())
        .status();
    let hard = std::fs::read_to_string("/proc/self/limits")?
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).and_then(|v| v.parse().ok()))
        .context("no open files limit in /proc/self/limits")?;
    let _ = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .stderr(Stdio::null())
        .status();
    Ok(hard)
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

async fn bench() -> Result<()> {
    let fd_limit = raise_fd_limit()?;
    // Two descriptors per proxied connection, and room for the proxy's own.
    let idle_connections =
        IDLE_CONNECTIONS_WANTED.min((fd_limit.saturating_sub(200) / 2) as usize) / 100 * 100;
    let threads: usize = std::env::var("KILN_BENCH_PROXY_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let secs: f64 = std::env::var("KILN_BENCH_EDGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let rounds = 3;
    let haproxy_version = version("haproxy", "-v");
    ensure!(
        haproxy_version.contains("version 2.6"),
        "HAProxy 2.6 is the anchor; found {haproxy_version:?}"
    );
    let built = build_kilnd()?;
    let dir = tempfile::tempdir()?;
    // A private copy: another build relinking target/*/kilnd mid-run must not pull it away.
    let kilnd = dir.path().join("kilnd");
    std::fs::copy(&built, &kilnd).with_context(|| format!("cannot copy {}", built.display()))?;

    let key_pair = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![SNI.to_owned()])?.self_signed(&key_pair)?;
    let cert_path = dir.path().join("cert.der");
    let key_path = dir.path().join("key.der");
    std::fs::write(&cert_path, cert.der())?;
    std::fs::write(&key_path, key_pair.serialize_der())?;

    let exe = std::env::current_exe()?;
    let mut backends = Vec::new();
    let mut backend_procs = Vec::new();
    for _ in 0..2 {
        let mut child = Command::new(&exe)
            .args(["edge", "--backend"])
            .arg(&cert_path)
            .arg(&key_path)
            .stdout(Stdio::piped())
            .spawn()?;
        let addr: SocketAddr = wait_line(&mut child, "backend ")?.parse()?;
        backends.push(addr);
        backend_procs.push(Proc {
            child,
            name: "backend",
        });
    }
    let (edge, edge_addr) = start_kiln_edge(&kilnd, dir.path(), &backends, threads)?;
    let (haproxy, haproxy_addr) = start_haproxy(dir.path(), &backends, threads, fd_limit / 2 - 10)?;
    wait_listening(edge_addr).await?;
    wait_listening(haproxy_addr).await?;
    let cfg = client_config()?;
    let proxies = [(&edge, edge_addr), (&haproxy, haproxy_addr)];

    println!(
        "edge benchmark: kilnd edge ({}) vs {haproxy_version}, {threads} proxy threads each, profile {}",
        built.display(),
        if crate::dev::release() { "release" } else { "debug" }
    );
    println!(
        "  CPUs: {} cores, no pinning: load generator (this process, 2 threads), 2 backends (2 threads each) and the proxy under test share them; the other proxy idles",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    // Warm-up: both proxies and backends see traffic before anything is measured.
    for (_, addr) in proxies {
        latency(addr, &cfg, 200).await?;
    }

    // 1. Latency.
    let n_lat = 2000;
    let mut lat: [Vec<f64>; 3] = Default::default(); // direct, edge, haproxy p50
    let mut lat99: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        let mut order = vec![(0usize, backends[0]), (1, edge_addr), (2, haproxy_addr)];
        if round % 2 == 1 {
            order.swap(1, 2);
        }
        for (i, addr) in order {
            let v = latency(addr, &cfg, n_lat).await?;
            lat[i].push(percentile(&v, 0.5).as_secs_f64() * 1e6);
            lat99[i].push(percentile(&v, 0.99).as_secs_f64() * 1e6);
        }
    }
    let [d50, e50, h50] = lat.map(|mut v| median(&mut v));
    let [d99, e99, h99] = lat99.map(|mut v| median(&mut v));
    println!("  latency, {n_lat} sequential full connections x {rounds} rounds (median of rounds): direct p50 {d50:.0} us p99 {d99:.0} us; edge p50 {e50:.0} us p99 {e99:.0} us; haproxy p50 {h50:.0} us p99 {h99:.0} us");

    // 2. Connection rate: many short slices in ABBA order (edge, haproxy, haproxy, edge, ...), so
    // that whatever else the machine does hits both proxies alike.
    let slices: usize = std::env::var("KILN_BENCH_EDGE_SLICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut conns = [0usize; 2];
    let mut busy = [0f64; 2];
    let mut cpu_total = [Duration::ZERO; 2];
    let mut lats: [Vec<Duration>; 2] = Default::default();
    let mut errors = [0usize; 2];
    for slice in 0..slices {
        let order = if slice % 2 == 0 { [0usize, 1] } else { [1, 0] };
        for i in order {
            let (p, addr) = proxies[i];
            let r = rate(addr, &cfg, secs, Some(p.pid())).await?;
            conns[i] += r.count;
            busy[i] += r.elapsed;
            cpu_total[i] += r.cpu;
            errors[i] += r.errors;
            lats[i].extend(r.latencies);
        }
    }
    for l in &mut lats {
        l.sort();
    }
    let [er, hr] = [0, 1].map(|i| conns[i] as f64 / busy[i]);
    let [el50, hl50] = [0, 1].map(|i| percentile(&lats[i], 0.5).as_secs_f64() * 1e3);
    let [el99, hl99] = [0, 1].map(|i| percentile(&lats[i], 0.99).as_secs_f64() * 1e3);
    let [ecpu, hcpu] = [0, 1].map(|i| cpu_total[i].as_secs_f64() * 1e6 / conns[i].max(1) as f64);
    println!(
        "  rate, {RATE_CONCURRENCY} concurrent clients, {slices} slices of {secs} s per proxy in ABBA order: edge {} connections in {:.1} s ({er:.0}/s, p50 {el50:.2} ms, p99 {el99:.2} ms, proxy CPU {ecpu:.1} us/conn); haproxy {} in {:.1} s ({hr:.0}/s, p50 {hl50:.2} ms, p99 {hl99:.2} ms, proxy CPU {hcpu:.1} us/conn)",
        conns[0], busy[0], conns[1], busy[1]
    );
    let direct = rate(backends[0], &cfg, secs, None).await?;
    let direct_rate = direct.count as f64 / direct.elapsed;
    println!("  rate direct to one backend: {direct_rate:.0} conn/s");

    // 3. Throughput.
    let mut tput: [Vec<f64>; 2] = Default::default();
    for round in 0..rounds {
        let mut order = vec![0usize, 1];
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            tput[i].push(throughput(proxies[i].1, &cfg).await?);
        }
    }
    let direct_tput = throughput(backends[0], &cfg).await?;
    let [et, ht] = tput.map(|mut v| median(&mut v));
    println!("  throughput, 1 GiB over one connection x {rounds} rounds (median): edge {et:.0} MiB/s, haproxy {ht:.0} MiB/s, direct {direct_tput:.0} MiB/s");

    // 4. Memory with idle connections.
    let mut mem = [(0u64, 0u64); 2];
    for (i, (p, addr)) in proxies.iter().enumerate() {
        mem[i] = idle_memory(*addr, &cfg, p.pid(), idle_connections).await?;
        println!(
            "  memory {}: RSS {} KiB before, {} KiB with {idle_connections} idle connections (open files limit {fd_limit})",
            p.name, mem[i].0, mem[i].1
        );
    }
    let per_conn =
        |(b, w): (u64, u64)| (w.saturating_sub(b)) as f64 * 1024.0 / idle_connections as f64;

    println!("proxy_threads={threads}");
    println!("cpu_layout=shared_2_cores_unpinned");
    println!("direct_latency_p50_us={d50:.0}");
    println!("direct_latency_p99_us={d99:.0}");
    println!("edge_latency_p50_us={e50:.0}");
    println!("edge_latency_p99_us={e99:.0}");
    println!("haproxy_latency_p50_us={h50:.0}");
    println!("haproxy_latency_p99_us={h99:.0}");
    println!("edge_added_latency_p50_us={:.0}", e50 - d50);
    println!("haproxy_added_latency_p50_us={:.0}", h50 - d50);
    println!("direct_conn_rate={direct_rate:.0}");
    println!("edge_conn_rate={er:.0}");
    println!("haproxy_conn_rate={hr:.0}");
    println!("edge_loaded_latency_p50_ms={el50:.2}");
    println!("edge_loaded_latency_p99_ms={el99:.2}");
    println!("haproxy_loaded_latency_p50_ms={hl50:.2}");
    println!("haproxy_loaded_latency_p99_ms={hl99:.2}");
    println!("edge_cpu_us_per_conn={ecpu:.1}");
    println!("haproxy_cpu_us_per_conn={hcpu:.1}");
    println!("edge_errors={}", errors[0]);
    println!("haproxy_errors={}", errors[1]);
    println!("direct_throughput_mib_s={direct_tput:.0}");
    println!("edge_throughput_mib_s={et:.0}");
    println!("haproxy_throughput_mib_s={ht:.0}");
    println!("idle_connections={idle_connections}");
    println!("edge_rss_idle_kib={}", mem[0].1);
    println!("haproxy_rss_idle_kib={}", mem[1].1);
    println!("edge_rss_per_idle_conn_bytes={:.0}", per_conn(mem[0]));
    println!("haproxy_rss_per_idle_conn_bytes={:.0}", per_conn(mem[1]));
    println!("edge_vs_haproxy_conn_rate={:.3}", er / hr);
    drop(backend_procs);
    Ok(())
}
