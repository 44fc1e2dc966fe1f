//! The control plane's DNS client: one TXT lookup through one configured recursive resolver,
//! over UDP, again over TCP when the answer is truncated. The codec is `kiln_types::dns`.
//!
//! 1. A UDP socket connected to the resolver (so the kernel drops datagrams from anyone else)
//!    sends the query with a random id; answers whose id or question differ are ignored (a spoofer
//!    must guess both), until the attempt's timeout. Two attempts.
//! 2. A `TC` answer is asked again over TCP (two-byte length prefix, at most 65,535 bytes).
//! 3. The caller gets the response code and the TXT strings at the name (after CNAMEs).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use kiln_types::dns::{self, DnsError, Rcode};

/// Longest wait for one answer (per UDP attempt, and for the whole TCP exchange).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const UDP_ATTEMPTS: usize = 2;

/// What the resolver answered for `<name> TXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TxtAnswer {
    pub rcode: Rcode,
    /// Each TXT record's strings concatenated, as text (invalid UTF-8 replaced).
    pub records: Vec<String>,
}

/// A lookup could not get an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupError {
    #[error("cannot encode the query for {name}")]
    Query {
        name: String,
        #[source]
        source: DnsError,
    },
    #[error("cannot reach the resolver {resolver} over UDP")]
    Udp {
        resolver: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the resolver {resolver} did not answer within {timeout:?} ({attempts} attempts)")]
    Timeout {
        resolver: SocketAddr,
        timeout: Duration,
        attempts: usize,
    },
    #[error("cannot ask the resolver {resolver} over TCP (the UDP answer was truncated)")]
    Tcp {
        resolver: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the resolver {resolver} sent a malformed answer")]
    Malformed {
        resolver: SocketAddr,
        #[source]
        source: DnsError,
    },
}

/// Looks up the TXT records at `name` through `resolver`.
pub(crate) async fn lookup_txt(resolver: SocketAddr, name: &str) -> Result<TxtAnswer, LookupError> {
    let qname = dns::name_of(name);
    let mut id_bytes = [0u8; 2];
    getrandom::fill(&mut id_bytes).unwrap_or_default();
    let id = u16::from_be_bytes(id_bytes);
    let query = dns::txt_query(id, name).map_err(|source| LookupError::Query {
        name: name.to_owned(),
        source,
    })?;
    let mut response = udp(resolver, id, &qname, &query).await?;
    if response.truncated {
        response = tcp(resolver, id, &qname, &query).await?;
    }
    let records = response
        .txt_for(&qname)
        .into_iter()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect();
    Ok(TxtAnswer {
        rcode: response.rcode,
        records,
    })
}

fn matches(r: &dns::Response, id: u16, qname: &dns::Name) -> bool {
    r.id == id && r.question.as_ref() == Some(qname)
}

async fn udp(
    resolver: SocketAddr,
    id: u16,
    qname: &dns::Name,
    query: &[u8],
) -> Result<dns::Response, LookupError> {
    let err = |source| LookupError::Udp { resolver, source };
    let local: SocketAddr = match resolver.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(err)?;
    socket.connect(resolver).await.map_err(err)?;
    let mut buf = vec![0u8; dns::UDP_MAX];
    for _ in 0..UDP_ATTEMPTS {
        socket.send(query).await.map_err(err)?;
        let deadline = tokio::time::Instant::now() + ATTEMPT_TIMEOUT;
        loop {
            let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_) => break,
                Ok(r) => r.map_err(err)?,
            };
            // Anything that is not the answer to this question is ignored, not an error: a late
            // answer to an earlier attempt, or someone guessing.
            let Some(datagram) = buf.get(..n) else {
                continue;
            };
            match dns::parse_response(datagram) {
                Ok(r) if matches(&r, id, qname) => return Ok(r),
                Ok(_) => continue,
                Err(source) => {
                    // Only an answer carrying our id counts as the resolver's malformed answer.
                    if datagram.get(..2) == Some(&id.to_be_bytes()[..]) {
                        return Err(LookupError::Malformed { resolver, source });
                    }
                }
            }
        }
    }
    Err(LookupError::Timeout {
        resolver,
        timeout: ATTEMPT_TIMEOUT,
        attempts: UDP_ATTEMPTS,
    })
}

async fn tcp(
    resolver: SocketAddr,
    id: u16,
    qname: &dns::Name,
    query: &[u8],
) -> Result<dns::Response, LookupError> {
    let exchange = async {
        let mut stream = TcpStream::connect(resolver).await?;
        let len = u16::try_from(query.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        let len = usize::from(stream.read_u16().await?);
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg).await?;
        Ok::<_, std::io::Error>(msg)
    };
    let msg = match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
        Err(_) => {
            return Err(LookupError::Timeout {
                resolver,
                timeout: ATTEMPT_TIMEOUT,
                attempts: 1,
            })
        }
        Ok(r) => r.map_err(|source| LookupError::Tcp { resolver, source })?,
    };
    let r =
        dns::parse_response(&msg).map_err(|source| LookupError::Malformed { resolver, source })?;
    if !matches(&r, id, qname) {
        return Err(LookupError::Malformed {
            resolver,
            source: DnsError::Short {
                what: "an answer to another question",
                len: msg.len(),
            },
        });
    }
    Ok(r)
}

/// The first `nameserver` of a resolv.conf text, on port 53.
pub fn first_nameserver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            return None;
        }
        // An IPv6 address may carry a zone (`fe80::1%eth0`), which an `IpAddr` cannot hold.
        let addr = words.next()?.split('%').next()?;
        addr.parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// The system's resolver: the first nameserver of /etc/resolv.conf.
pub fn system_resolver() -> Option<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|t| first_nameserver(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# generated\nsearch example\nnameserver 10.0.0.53\nnameserver 1.1.1.1\n";
        assert_eq!(
            first_nameserver(text),
            Some("10.0.0.53:53".parse().unwrap())
        );
        assert_eq!(
            first_nameserver("nameserver fe80::1%eth0\n"),
            Some("[fe80::1]:53".parse().unwrap())
        );
        assert_eq!(first_nameserver("options ndots:2\n"), None);
    }

    /// A resolver on 127.0.0.1 that first sends junk and a spoofed answer (wrong id), then the
    /// real answer truncated, and serves the full answer over TCP on the same port.
    #[tokio::test]
    async fn ignores_spoofs_and_falls_back_to_tcp_on_truncation() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        let name = "_kiln-challenge.www.example.test";
        let long = "v".repeat(700);
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            assert_eq!(n, dns::txt_query(id, name).unwrap().len());
            udp.send_to(b"junk", peer).await.unwrap();
            let spoof = dns::txt_response(
                id.wrapping_add(1),
                name,
                Rcode::NOERROR,
                &[b"kiln-verify=evil"],
            )
            .unwrap();
            udp.send_to(&spoof, peer).await.unwrap();
            let mut tc = dns::txt_response(id, name, Rcode::NOERROR, &[]).unwrap();
            tc[2] |= 0x02;
            udp.send_to(&tc, peer).await.unwrap();
            let (mut s, _) = tcp.accept().await.unwrap();
            let len = s.read_u16().await.unwrap();
            let mut q = vec![0u8; usize::from(len)];
            s.read_exact(&mut q).await.unwrap();
            let full = dns::txt_response(
                id,
                name,
                Rcode::NOERROR,
                &[b"kiln-verify=abc", long.as_bytes()],
            )
            .unwrap();
            s.write_all(&(full.len() as u16).to_be_bytes())
                .await
                .unwrap();
            s.write_all(&full).await.unwrap();
        });
        let answer = lookup_txt(addr, name).await.unwrap();
        assert_eq!(answer.rcode, Rcode::NOERROR);
        assert_eq!(
            answer.records,
            ["kiln-verify=abc".to_owned(), "v".repeat(700)]
        );
    }

    #[tokio::test]
    async fn a_closed_port_fails_fast() {
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let started = std::time::Instant::now();
        let err = lookup_txt(port, "_kiln-challenge.a.example")
            .await
            .unwrap_err();
        assert!(matches!(err, LookupError::Udp { .. }), "{err:?}");
        assert!(started.elapsed() < ATTEMPT_TIMEOUT);
    }
}
