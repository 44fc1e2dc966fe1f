//! A throwaway DNS server: Debian's `dnsmasq` on 127.0.0.1 at a free port, answering only the
//! TXT records it is given (`--no-resolv --no-hosts`: it never forwards a query off the machine).
//! Custom-domain tests point the control plane's `--dns-resolver` at it.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const DNSMASQ_BIN: &str = "dnsmasq";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const PORT_ATTEMPTS: usize = 8;

/// A running dnsmasq; killed (and reaped) on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Dnsmasq {
    /// Starts dnsmasq on 127.0.0.1 at a free port serving `txt` (name, value) records.
    pub fn start(txt: &[(&str, &str)]) -> Result<Dnsmasq> {
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            match Self::start_at(free_port()?, txt) {
                Ok(d) => return Ok(d),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .context("starting dnsmasq: no free port")
    }

    /// Starts dnsmasq at `addr` (a loopback address; tests that must name the resolver before
    /// they know the records restart it at the same address).
    pub fn start_at(addr: SocketAddr, txt: &[(&str, &str)]) -> Result<Dnsmasq> {
        if !addr.ip().is_loopback() {
            bail!("dnsmasq is only started on loopback, not {addr}");
        }
        let mut cmd = Command::new(DNSMASQ_BIN);
        cmd.arg("--keep-in-foreground")
            .arg(format!("--port={}", addr.port()))
            .arg(format!("--listen-address={}", addr.ip()))
            .args([
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--no-negcache",
                "--conf-file=/dev/null",
                "--pid-file=",
            ]);
        for (name, value) in txt {
            // `name,text`: passed without a shell, so no quotes (dnsmasq would keep them); a
            // comma in `value` would start a second string of the record.
            cmd.arg(format!("--txt-record={name},{value}"));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("spawning {DNSMASQ_BIN} (install it: apt-get install dnsmasq-base, or ./scripts/install-deps)")
            })?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("dnsmasq at {addr} exited at start ({status}); the port may be taken");
            }
            if answers(addr) {
                return Ok(Dnsmasq { child, addr });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("dnsmasq at {addr} did not answer within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both), right now.
pub fn free_port() -> Result<SocketAddr> {
    for _ in 0..32 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a UDP port")?;
        let addr = udp.local_addr()?;
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no port free for both UDP and TCP on 127.0.0.1")
}

/// Whether a DNS server at `addr` answers a query (any answer).
fn answers(addr: SocketAddr) -> bool {
    let Ok(socket) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) else {
        return false;
    };
    let Ok(query) = kiln_types::dns::txt_query(7, "ready.kiln-testkit.test") else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 512];
    socket.send_to(&query, addr).is_ok() && socket.recv_from(&mut buf).is_ok()
}
