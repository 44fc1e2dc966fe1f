//! Network configuration inside the instance, over rtnetlink (no `ip` binary in the image).
//!
//! 1. bring `lo` up;
//! 2. bring the instance's interface up;
//! 3. add its overlay address as a /128 with `IFA_F_NODAD` (addresses are unique by IPAM, and
//!    duplicate address detection would hold the address back for a second or more);
//! 4. add the default route via the gateway, on-link on that interface.
//!
//! Each request asks for an acknowledgement and its error, if any, is returned with the step.

use std::net::Ipv6Addr;

use kiln_types::guest::GuestNetwork;

const NLMSG_HDRLEN: usize = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_REPLACE: u16 = 0x100;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const RTA_GATEWAY: u16 = 5;
const RTA_OIF: u16 = 4;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 0x1;

/// A netlink request being built: header, fixed part, attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32) -> Msg {
        let mut v = vec![0u8; NLMSG_HDRLEN];
        v[4..6].copy_from_slice(&kind.to_ne_bytes());
        v[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        v[8..12].copy_from_slice(&seq.to_ne_bytes());
        Msg(v)
    }

    fn bytes(mut self, b: &[u8]) -> Msg {
        self.0.extend_from_slice(b);
        self
    }

    fn attr(mut self, kind: u16, payload: &[u8]) -> Msg {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

struct Socket(libc::c_int);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: closing the descriptor this struct owns.
        unsafe { libc::close(self.0) };
    }
}

impl Socket {
    fn open() -> std::io::Result<Socket> {
        // SAFETY: plain socket(2) call.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Socket(fd))
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, msg: &[u8]) -> std::io::Result<()> {
        // SAFETY: msg is a valid buffer; the kernel is the peer (sockaddr_nl zeroed = kernel).
        let sent = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.0,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        // SAFETY: buf is a valid, writable buffer of its length.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let reply = &buf[..n as usize];
        // The acknowledgement is an NLMSG_ERROR whose error code is 0 on success (-errno otherwise).
        if reply.len() >= NLMSG_HDRLEN + 4
            && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR
        {
            let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            if code != 0 {
                return Err(std::io::Error::from_raw_os_error(-code));
            }
            return Ok(());
        }
        Err(std::io::Error::other("unexpected netlink reply"))
    }
}

fn ifindex(name: &str) -> std::io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::other("interface name has a NUL byte"))?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(idx)
}

fn link_up(sock: &Socket, index: u32, seq: u32) -> std::io::Result<()> {
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut ifi = [0u8; 16];
    ifi[0] = libc::AF_UNSPEC as u8;
    ifi[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    ifi[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
    ifi[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
    sock.request(&Msg::new(RTM_NEWLINK, 0, seq).bytes(&ifi).finish())
}

fn add_address(sock: &Socket, index: u32, addr: Ipv6Addr, seq: u32) -> std::io::Result<()> {
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    let mut ifa = [0u8; 8];
    ifa[0] = libc::AF_INET6 as u8;
    ifa[1] = 128;
    ifa[4..8].copy_from_slice(&index.to_ne_bytes());
    let msg = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, seq)
        .bytes(&ifa)
        .attr(IFA_LOCAL, &addr.octets())
        .attr(IFA_ADDRESS, &addr.octets())
        .attr(IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
    sock.request(&msg.finish())
}

fn add_default_route(
    sock: &Socket,
    index: u32,
    gateway: Ipv6Addr,
    seq: u32,
) -> std::io::Result<()> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let rtm = [
        libc::AF_INET6 as u8,
        0,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ];
    let msg = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq)
        .bytes(&rtm)
        .attr(RTA_GATEWAY, &gateway.octets())
        .attr(RTA_OIF, &index.to_ne_bytes());
    sock.request(&msg.finish())
}

/// Applies `net`; the error names the step that failed.
pub(crate) fn configure(net: &GuestNetwork) -> Result<(), String> {
    let sock = Socket::open().map_err(|e| format!("netlink socket: {e}"))?;
    let lo = ifindex("lo").map_err(|e| format!("interface lo: {e}"))?;
    link_up(&sock, lo, 1).map_err(|e| format!("bring lo up: {e}"))?;
    let index = ifindex(&net.interface).map_err(|e| format!("interface {}: {e}", net.interface))?;
    link_up(&sock, index, 2).map_err(|e| format!("bring {} up: {e}", net.interface))?;
    add_address(&sock, index, net.ipv6, 3)
        .map_err(|e| format!("add {}/128 to {}: {e}", net.ipv6, net.interface))?;
    add_default_route(&sock, index, net.gateway, 4)
        .map_err(|e| format!("add default route via {}: {e}", net.gateway))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_framed_and_aligned() {
        let m = Msg::new(RTM_NEWADDR, NLM_F_CREATE, 7)
            .bytes(&[1, 2, 3, 4, 5, 6, 7, 8])
            .attr(IFA_FLAGS, &[9, 9, 9])
            .finish();
        assert_eq!(m.len(), 16 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWADDR);
        assert_eq!(
            u16::from_ne_bytes([m[6], m[7]]),
            NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(u32::from_ne_bytes([m[8], m[9], m[10], m[11]]), 7);
        // The attribute's length excludes its padding.
        assert_eq!(u16::from_ne_bytes([m[24], m[25]]), 7);
        assert_eq!(&m[28..32], &[9, 9, 9, 0]);
    }
}
