//! hello-tls: Kiln's sample app.
//!
//! A tiny TLS server (std threads, no async runtime) that answers every HTTPS request with one line
//! naming the app, the SNI the client sent and the client's address. It exists so that tests and demos
//! can check, from outside, that the edge passed TLS through untouched (the SNI arrives here, and the
//! certificate is this process's own) and that the PROXY protocol v2 header carried the real client
//! address (ADR 0008 and 0009).
//!
//! Environment:
//! - `PORT` (default 8443): listens on `[::]:PORT` (dual-stack), or `0.0.0.0:PORT` without IPv6.
//! - `KILN_APP_NAME` (default `hello-tls`), `GREETING` (default `hello`): go into the response body.
//! - `PROXY_PROTOCOL=v2`: every connection must start with a PROXY protocol v2 header.
//! - `TLS_HOSTNAMES`: extra comma-separated names (or IPs) for the self-signed certificate.
//!
//! Built as a static binary (`-C target-feature=+crt-static`) so it runs from an otherwise empty image.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection};

/// Per-syscall socket timeout the brief asks for.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-connection budget: per-read timeouts alone would let a client that trickles one byte every
/// few seconds hold a thread for minutes.
const CONNECTION_BUDGET: Duration = Duration::from_secs(30);
/// Largest request head we read before giving up.
const MAX_HEAD: usize = 16 * 1024;
/// Thread-per-connection needs a cap, or a connection flood becomes a thread (memory) flood.
const MAX_CONNECTIONS: usize = 1024;

struct Settings {
    app: String,
    greeting: String,
    proxy_v2: bool,
    tls: Arc<ServerConfig>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("hello-tls: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    install_signal_handlers()?;

    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.parse().map_err(|_| format!("invalid PORT {p:?}"))?,
        Err(_) => 8443,
    };
    let app = env_or("KILN_APP_NAME", "hello-tls");
    let greeting = env_or("GREETING", "hello");
    let proxy_v2 = match std::env::var("PROXY_PROTOCOL").as_deref() {
        Ok("v2") => true,
        Ok("") | Err(_) => false,
        Ok(other) => {
            return Err(format!("unsupported PROXY_PROTOCOL {other:?} (only \"v2\")").into())
        }
    };

    let mut names = vec!["localhost".to_string(), "*.kiln.test".to_string()];
    if let Ok(extra) = std::env::var("TLS_HOSTNAMES") {
        names.extend(
            extra
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    let tls = Arc::new(tls_config(names)?);

    let listener = bind(port)?;
    println!(
        "hello-tls: app={app} listening on {} proxy_protocol={}",
        listener.local_addr()?,
        if proxy_v2 { "v2" } else { "off" }
    );
    let settings = Arc::new(Settings {
        app,
        greeting,
        proxy_v2,
        tls,
    });
    let active = Arc::new(AtomicUsize::new(0));

    for incoming in listener.incoming() {
        let tcp = match incoming {
            Ok(tcp) => tcp,
            Err(e) => {
                // EMFILE and friends are transient; back off briefly instead of spinning.
                eprintln!("hello-tls: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue; // dropping the stream closes it
        }
        let settings = Arc::clone(&settings);
        let guard = ActiveGuard(Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _guard = guard;
                serve(&settings, tcp);
            });
        if let Err(e) = spawned {
            eprintln!("hello-tls: spawn: {e}");
        }
    }
    Ok(())
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// SIGTERM/SIGINT exit 0 at once: there is no state to flush, and under a PID namespace the app may be
/// PID 1, where the kernel's default "terminate" disposition does not apply.
fn install_signal_handlers() -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                println!("hello-tls: signal {sig}, exiting");
                std::process::exit(0);
            }
        })?;
    Ok(())
}

fn bind(port: u16) -> io::Result<TcpListener> {
    // `[::]` is dual-stack on Linux unless net.ipv6.bindv6only=1; a guest without IPv6 fails this bind
    // with EAFNOSUPPORT/EADDRNOTAVAIL, so fall back to IPv4 only.
    match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(l) => Ok(l),
        Err(e6) => TcpListener::bind(("0.0.0.0", port)).map_err(|e4| {
            io::Error::new(
                e4.kind(),
                format!("bind [::]:{port}: {e6}; bind 0.0.0.0:{port}: {e4}"),
            )
        }),
    }
}

fn tls_config(names: Vec<String>) -> Result<ServerConfig, Box<dyn std::error::Error>> {
    let certified = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    // Explicit provider: the workspace builds rustls without a default provider choice.
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
    Ok(config)
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one connection learned, for the log line.
struct ConnInfo {
    client: IpAddr,
    sni: Option<String>,
    authority: Option<String>,
}

fn serve(settings: &Settings, tcp: TcpStream) {
    let peer = match tcp.peer_addr() {
        Ok(p) => canonical(p.ip()),
        Err(_) => return, // already gone
    };
    let mut info = ConnInfo {
        client: peer,
        sni: None,
        authority: None,
    };
    let outcome = handle(settings, tcp, &mut info);
    let mut out = io::stdout().lock();
    // Logging must never take the server down (stdout may be a closed pipe).
    let _ = writeln!(
        out,
        "hello-tls: app={} client={} sni={} authority={} result={}",
        settings.app,
        info.client,
        info.sni.as_deref().unwrap_or("-"),
        info.authority.as_deref().unwrap_or("-"),
        match &outcome {
            Ok(status) => status.to_string(),
            Err(e) => format!("error({e})"),
        }
    );
}

/// Dual-stack sockets report IPv4 peers as `::ffff:a.b.c.d`; show them as plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Sets the read timeout to the per-read limit, or less when the connection budget runs out.
fn arm_timeout(tcp: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection budget exhausted",
        ));
    }
    tcp.set_read_timeout(Some(left.min(IO_TIMEOUT)))?;
    Ok(())
}

fn handle(settings: &Settings, mut tcp: TcpStream, info: &mut ConnInfo) -> io::Result<u16> {
    let deadline = Instant::now() + CONNECTION_BUDGET;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    tcp.set_nodelay(true)?;

    if settings.proxy_v2 {
        arm_timeout(&tcp, deadline)?;
        let header = proxy_v2::read(&mut tcp)?;
        if let Some(src) = header.source {
            info.client = canonical(src.ip());
        }
        info.authority = header.authority;
    }

    let mut conn = ServerConnection::new(Arc::clone(&settings.tls)).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        arm_timeout(&tcp, deadline)?;
        conn.complete_io(&mut tcp)?;
    }
    info.sni = conn.server_name().map(str::to_string);

    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(end) = find_head_end(&head) {
            break end;
        }
        if head.len() >= MAX_HEAD {
            respond(&mut tls, 431, "request header fields too large\n", false)?;
            return Ok(431);
        }
        arm_timeout(&tls.sock, deadline)?;
        let want = chunk.len().min(MAX_HEAD - head.len());
        let n = tls.read(&mut chunk[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "eof before request head",
            ));
        }
        head.extend_from_slice(&chunk[..n]);
    };

    let Some(method) = request_method(&head[..head_end]) else {
        respond(&mut tls, 400, "bad request\n", false)?;
        return Ok(400);
    };
    let body = format!(
        "{} from {} sni={} client={}\n",
        settings.greeting,
        settings.app,
        info.sni.as_deref().unwrap_or("-"),
        info.client
    );
    respond(&mut tls, 200, &body, method == "HEAD")?;
    Ok(200)
}

/// Index just past the blank line ending the head (CRLF CRLF, or bare LF LF from sloppy clients).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        return Some(i + 4);
    }
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

/// The method of an `METHOD SP target SP HTTP/1.x` request line, if the line is well formed.
fn request_method(head: &[u8]) -> Option<&str> {
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end])
        .ok()?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if parts.next().is_some() || !token(method) || !token(target) {
        return None;
    }
    version
        .strip_prefix("HTTP/1.")
        .filter(|minor| minor.len() == 1)?;
    Some(method)
}

fn respond<S: Read + Write>(
    tls: &mut rustls::StreamOwned<ServerConnection, S>,
    status: u16,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Request Header Fields Too Large",
    };
    let mut resp = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        resp.extend_from_slice(body.as_bytes());
    }
    tls.write_all(&resp)?;
    // close_notify tells the client the body is complete and untruncated.
    tls.conn.send_close_notify();
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock)?;
    }
    tls.sock.flush()
}

/// PROXY protocol version 2 (haproxy `proxy-protocol.txt` §2.2), receiving side.
///
/// Total and bounded: the header is at most 16 + 65535 bytes (its length field is a u16), it is read
/// with exact-length reads so no TLS byte after it is consumed, and every malformed input is an error.
mod proxy_v2 {
    use std::io::{self, Read};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
    const PP2_TYPE_AUTHORITY: u8 = 0x02;

    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct Header {
        /// The original client, for PROXY over TCP4/TCP6; `None` means "use the socket's peer"
        /// (LOCAL command, or a family we do not interpret).
        pub source: Option<SocketAddr>,
        pub destination: Option<SocketAddr>,
        /// PP2_TYPE_AUTHORITY: the host name the client asked for (usually its SNI).
        pub authority: Option<String>,
    }

    #[derive(Debug, PartialEq, Eq)]
    pub enum Error {
        Signature,
        Version(u8),
        Command(u8),
        Family(u8),
        /// The length field is smaller than the address block the family needs.
        ShortAddresses,
        /// A TLV runs past the end of the header.
        Tlv,
        /// PP2_TYPE_AUTHORITY is not UTF-8.
        Authority,
    }

    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Error::Signature => write!(f, "not a PROXY v2 header"),
                Error::Version(v) => write!(f, "PROXY version {v} unsupported"),
                Error::Command(c) => write!(f, "PROXY command {c:#x} invalid"),
                Error::Family(x) => write!(f, "PROXY family/transport {x:#04x} invalid"),
                Error::ShortAddresses => write!(f, "PROXY header shorter than its address block"),
                Error::Tlv => write!(f, "PROXY TLV truncated"),
                Error::Authority => write!(f, "PROXY authority TLV is not UTF-8"),
            }
        }
    }

    impl std::error::Error for Error {}

    /// Checks the fixed 16-byte preamble; returns the length of the variable part that follows.
    pub fn preamble(pre: &[u8; 16]) -> Result<usize, Error> {
        if pre[..12] != SIGNATURE {
            return Err(Error::Signature);
        }
        let version = pre[12] >> 4;
        if version != 2 {
            return Err(Error::Version(version));
        }
        let command = pre[12] & 0x0f;
        if command > 1 {
            return Err(Error::Command(command));
        }
        Ok(usize::from(u16::from_be_bytes([pre[14], pre[15]])))
    }

    /// Parses a whole header: the 16-byte preamble and its `rest` (exactly the announced length).
    pub fn parse(pre: &[u8; 16], rest: &[u8]) -> Result<Header, Error> {
        let len = preamble(pre)?;
        if rest.len() != len {
            return Err(Error::ShortAddresses);
        }
        let (command, family) = (pre[12] & 0x0f, pre[13]);
        // Valid family/transport bytes: UNSPEC, and {INET, INET6, UNIX} x {STREAM, DGRAM}.
        if !matches!(family, 0x00 | 0x11 | 0x12 | 0x21 | 0x22 | 0x31 | 0x32) {
            return Err(Error::Family(family));
        }
        if command == 0 {
            // LOCAL (health checks from the proxy itself): the spec says to discard the block and
            // use the real connection endpoints.
            return Ok(Header::default());
        }
        let (source, destination, tlvs) = match family {
            0x11 => {
                let a = rest.get(..12).ok_or(Error::ShortAddresses)?;
                let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                (
                    SocketAddr::new(ip(0), port(8)),
                    SocketAddr::new(ip(4), port(10)),
                    &rest[12..],
                )
            }
            0x21 => {
                let a = rest.get(..36).ok_or(Error::ShortAddresses)?;
                let ip = |o: usize| {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&a[o..o + 16]);
                    IpAddr::V6(Ipv6Addr::from(b))
                };
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                (
                    SocketAddr::new(ip(0), port(32)),
                    SocketAddr::new(ip(16), port(34)),
                    &rest[36..],
                )
            }
            // UNSPEC, UDP and UNIX: receivers only need UNSPEC and must fall back to it for valid
            // combinations they do not implement, i.e. use the real endpoints. Without a known
            // address block the TLVs cannot be located, so they are skipped too.
            _ => return Ok(Header::default()),
        };
        Ok(Header {
            source: Some(source),
            destination: Some(destination),
            authority: authority(tlvs)?,
        })
    }

    /// Walks the TLV list (type u8, length u16, value) and returns the first authority, if any.
    fn authority(mut tlvs: &[u8]) -> Result<Option<String>, Error> {
        let mut found = None;
        while !tlvs.is_empty() {
            let [kind, hi, lo, ref tail @ ..] = *tlvs else {
                return Err(Error::Tlv);
            };
            let n = usize::from(u16::from_be_bytes([hi, lo]));
            let value = tail.get(..n).ok_or(Error::Tlv)?;
            if kind == PP2_TYPE_AUTHORITY && found.is_none() {
                let s = std::str::from_utf8(value).map_err(|_| Error::Authority)?;
                found = Some(s.to_string());
            }
            tlvs = &tail[n..];
        }
        Ok(found)
    }

    /// Reads exactly one header from the stream; malformed input is `InvalidData`.
    pub fn read(r: &mut impl Read) -> io::Result<Header> {
        let mut pre = [0u8; 16];
        r.read_exact(&mut pre)?;
        let len = preamble(&pre).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut rest = vec![0u8; len];
        r.read_exact(&mut rest)?;
        parse(&pre, &rest).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn header(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
            let mut v = SIGNATURE.to_vec();
            v.push(0x20 | cmd);
            v.push(fam);
            v.extend_from_slice(&(body.len() as u16).to_be_bytes());
            v.extend_from_slice(body);
            v
        }

        fn read_all(bytes: &[u8]) -> io::Result<Header> {
            read(&mut &bytes[..])
        }

        #[test]
        fn tcp4_with_authority_and_other_tlvs() {
            let mut body = vec![192, 0, 2, 7, 10, 0, 0, 1, 0x30, 0x39, 0x01, 0xbb];
            body.extend_from_slice(&[0x04, 0, 2, 0xaa, 0xbb]); // NOOP TLV, skipped
            body.extend_from_slice(&[0x02, 0, 11]);
            body.extend_from_slice(b"a.kiln.test");
            let h = read_all(&header(1, 0x11, &body)).unwrap();
            assert_eq!(h.source, Some("192.0.2.7:12345".parse().unwrap()));
            assert_eq!(h.destination, Some("10.0.0.1:443".parse().unwrap()));
            assert_eq!(h.authority.as_deref(), Some("a.kiln.test"));
        }

        #[test]
        fn tcp6() {
            let mut body = Vec::new();
            body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
            body.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
            body.extend_from_slice(&[0, 80, 0x20, 0xfb]);
            let h = read_all(&header(1, 0x21, &body)).unwrap();
            assert_eq!(h.source, Some("[2001:db8::1]:80".parse().unwrap()));
            assert_eq!(h.destination, Some("[2001:db8::2]:8443".parse().unwrap()));
            assert_eq!(h.authority, None);
        }

        #[test]
        fn local_and_unspec_use_the_socket_peer() {
            assert_eq!(read_all(&header(0, 0x00, &[])).unwrap(), Header::default());
            assert_eq!(
                read_all(&header(0, 0x11, &[1, 2, 3])).unwrap(),
                Header::default()
            );
            assert_eq!(
                read_all(&header(1, 0x00, &[9; 5])).unwrap(),
                Header::default()
            );
            assert_eq!(
                read_all(&header(1, 0x31, &[0; 216])).unwrap(),
                Header::default()
            );
        }

        #[test]
        fn does_not_consume_bytes_after_the_header() {
            let mut bytes = header(1, 0x11, &[1, 1, 1, 1, 2, 2, 2, 2, 0, 1, 0, 2]);
            bytes.extend_from_slice(b"\x16\x03\x01");
            let mut r = &bytes[..];
            read(&mut r).unwrap();
            assert_eq!(r, b"\x16\x03\x01");
        }

        #[test]
        fn rejects_malformed_headers() {
            let pre = |v: &[u8]| <[u8; 16]>::try_from(&v[..16]).unwrap();
            let ok = header(1, 0x11, &[0; 12]);
            let mut bad_sig = ok.clone();
            bad_sig[3] = 0;
            assert_eq!(preamble(&pre(&bad_sig)), Err(Error::Signature));
            let mut v1 = ok.clone();
            v1[12] = 0x11;
            assert_eq!(preamble(&pre(&v1)), Err(Error::Version(1)));
            let mut cmd = ok.clone();
            cmd[12] = 0x22;
            assert_eq!(preamble(&pre(&cmd)), Err(Error::Command(2)));
            let fam = header(1, 0x41, &[0; 12]);
            assert_eq!(parse(&pre(&fam), &fam[16..]), Err(Error::Family(0x41)));
            let short = header(1, 0x11, &[0; 11]);
            assert_eq!(
                parse(&pre(&short), &short[16..]),
                Err(Error::ShortAddresses)
            );
            let short6 = header(1, 0x21, &[0; 35]);
            assert_eq!(
                parse(&pre(&short6), &short6[16..]),
                Err(Error::ShortAddresses)
            );
            let mut tlv = vec![0; 12];
            tlv.extend_from_slice(&[0x02, 0, 5, b'a']);
            let tlv = header(1, 0x11, &tlv);
            assert_eq!(parse(&pre(&tlv), &tlv[16..]), Err(Error::Tlv));
            let mut half = vec![0; 12];
            half.extend_from_slice(&[0x02, 0]);
            let half = header(1, 0x11, &half);
            assert_eq!(parse(&pre(&half), &half[16..]), Err(Error::Tlv));
            let mut utf = vec![0; 12];
            utf.extend_from_slice(&[0x02, 0, 1, 0xff]);
            let utf = header(1, 0x11, &utf);
            assert_eq!(parse(&pre(&utf), &utf[16..]), Err(Error::Authority));
            // Truncated streams are errors, never hangs or panics.
            assert!(read_all(&ok[..20]).is_err());
            assert!(read_all(&ok[..5]).is_err());
        }

        #[test]
        fn never_panics_on_arbitrary_prefixes() {
            // Cheap exhaustive-ish sweep: every truncation and every single-byte corruption.
            let mut body = vec![192, 0, 2, 7, 10, 0, 0, 1, 0x30, 0x39, 0x01, 0xbb];
            body.extend_from_slice(&[0x02, 0, 3, b'a', b'.', b'b']);
            let good = header(1, 0x11, &body);
            for cut in 0..=good.len() {
                let _ = read_all(&good[..cut]);
            }
            for i in 0..good.len() {
                for b in [0u8, 0x01, 0x20, 0x7f, 0xff] {
                    let mut v = good.clone();
                    v[i] = b;
                    let _ = read_all(&v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_validation() {
        assert_eq!(
            request_method(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"),
            Some("GET")
        );
        assert_eq!(request_method(b"HEAD /x HTTP/1.0\n\n"), Some("HEAD"));
        assert_eq!(request_method(b"GET / HTTP/2\r\n\r\n"), None);
        assert_eq!(request_method(b"GET /  HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request_method(b"GET\r\n\r\n"), None);
        assert_eq!(request_method(b"\xff / HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn head_end() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn mapped_ipv4_is_shown_as_ipv4() {
        let ip: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(canonical(ip).to_string(), "127.0.0.1");
    }
}
