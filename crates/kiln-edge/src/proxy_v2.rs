//! PROXY protocol version 2 codec (haproxy `proxy-protocol.txt`, section 2.2).
//!
//! ADR 0009: the edge passes the client's address to backends by prepending a PROXY v2 header to
//! each backend connection that asks for it. [`ProxyHeader::encode`] writes that header;
//! [`decode`] reads one, for the components and tests that sit on the receiving side. Both are pure,
//! never panic, and are bounded by the format itself: a header is at most [`MAX_HEADER_LEN`] bytes.
//!
//! # Walk-through
//! 1. **Signature**, 12 bytes: [`SIGNATURE`]. It is compared byte by byte as bytes arrive, so a client
//!    that is not sending PROXY v2 is refused at its first differing byte ([`ProxyError::BadSignature`]).
//! 2. **Version and command**, 1 byte: the high nibble is the version and must be 2
//!    ([`ProxyError::BadVersion`]); the low nibble is `0` LOCAL (a health check or other connection
//!    made by the proxy itself) or `1` PROXY ([`ProxyError::BadCommand`] otherwise).
//! 3. **Family and transport**, 1 byte: `0x11` TCP over IPv4 and `0x21` TCP over IPv6 are decoded;
//!    `0x00` UNSPEC is accepted as [`Decoded::Local`] (the spec lets the receiver use the real
//!    connection endpoints); UDP, UNIX and undefined values are [`ProxyError::UnsupportedFamily`],
//!    because reporting a datagram or socket-path peer as a TCP client would be a lie. LOCAL ignores
//!    this byte, as the spec requires.
//! 4. **Length**, 2 bytes big-endian: the number of bytes after the 16-byte fixed part. It must cover
//!    the address block (12 bytes for TCP4, 36 for TCP6), else [`ProxyError::Malformed`], decided
//!    before waiting for the rest.
//! 5. **Addresses**: source address, destination address, source port, destination port, all in
//!    network byte order.
//! 6. **TLVs** fill the rest of the length: `type(1) | length(2) | value`. [`PP2_TYPE_AUTHORITY`] (the
//!    host name the client asked for, UTF-8) and [`PP2_TYPE_UNIQUE_ID`] (at most 128 opaque bytes) are
//!    read; every other type, including CRC32C which this decoder does not verify, is skipped. A TLV
//!    that overruns the header, a repeated known TLV or an invalid value is [`ProxyError::BadTlv`].
//!
//! The connection's payload starts right after the header: [`Decoded`] says how many bytes it took.

// The module promises totality: these lints make the compiler check it.
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The 12 bytes every PROXY v2 header starts with. They contain a NUL and "QUIT", so no valid HTTP,
/// TLS or v1 PROXY stream can start with them.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/transport, length.
const FIXED_LEN: usize = 16;
/// The length field is 16 bits, so no header is longer than this.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + u16::MAX as usize;

/// TLV carrying the host name the client asked for (for Kiln, the TLS SNI).
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// TLV carrying an opaque connection identifier.
pub const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
/// The spec's bound on [`PP2_TYPE_UNIQUE_ID`].
pub const MAX_UNIQUE_ID_LEN: usize = 128;
/// Kiln's bound on [`PP2_TYPE_AUTHORITY`]: the longest DNS name on the wire. The spec sets none, but
/// an authority is a host name, and a bound keeps encode and decode exact inverses.
pub const MAX_AUTHORITY_LEN: usize = 255;

const VERSION_2: u8 = 0x2;
const COMMAND_LOCAL: u8 = 0x0;
const COMMAND_PROXY: u8 = 0x1;
const FAMILY_UNSPEC: u8 = 0x00;
const FAMILY_TCP4: u8 = 0x11;
const FAMILY_TCP6: u8 = 0x21;
const ADDRESSES_TCP4_LEN: usize = 12;
const ADDRESSES_TCP6_LEN: usize = 36;
const TLV_HEADER_LEN: usize = 3;

/// A PROXY command header: who connected to whom, plus the TLVs Kiln uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client's address.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
    /// [`PP2_TYPE_AUTHORITY`]: the host name the client asked for, 1..=[`MAX_AUTHORITY_LEN`] bytes.
    pub authority: Option<String>,
    /// [`PP2_TYPE_UNIQUE_ID`]: an opaque id, at most [`MAX_UNIQUE_ID_LEN`] bytes.
    pub unique_id: Option<Vec<u8>>,
}

/// A decoded header and where the payload starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A PROXY command with TCP addresses.
    Proxy {
        /// The addresses and known TLVs.
        header: ProxyHeader,
        /// Header length: the payload starts at this offset.
        consumed: usize,
    },
    /// A LOCAL command, or PROXY with the UNSPEC family: use the real connection endpoints.
    Local {
        /// Header length: the payload starts at this offset.
        consumed: usize,
    },
}

/// Why [`decode`] did not return a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Not an error: the bytes so far are a valid beginning. Read more and call again.
    #[error("need more bytes to read the PROXY header")]
    NeedMore,
    /// The stream does not start with [`SIGNATURE`].
    #[error("no PROXY v2 signature")]
    BadSignature,
    /// The version nibble is not 2.
    #[error("PROXY protocol version {0} is not 2")]
    BadVersion(u8),
    /// The command nibble is neither LOCAL nor PROXY.
    #[error("unknown PROXY command {0:#x}")]
    BadCommand(u8),
    /// A PROXY command with a family/transport byte other than TCP4, TCP6 or UNSPEC.
    #[error("unsupported PROXY address family/transport {0:#04x}")]
    UnsupportedFamily(u8),
    /// The length field cannot hold the address block.
    #[error("malformed PROXY header: {reason}")]
    Malformed {
        /// What was wrong, for logs.
        reason: &'static str,
    },
    /// A TLV overruns the header, repeats, or holds an invalid value.
    #[error("bad PROXY TLV {tlv_type:#04x}: {reason}")]
    BadTlv {
        /// The TLV's type byte.
        tlv_type: u8,
        /// What was wrong, for logs.
        reason: &'static str,
    },
}

impl ProxyHeader {
    /// Appends the header to `out`: command PROXY, family TCP4 when both addresses are IPv4, TCP6
    /// otherwise (an IPv4 address paired with an IPv6 one is written IPv4-mapped, `::ffff:a.b.c.d`),
    /// then the authority and unique-id TLVs that are present.
    ///
    /// IPv6 flow info and scope ids are not part of the format and are dropped. A TLV that
    /// [`ProxyHeader::check`] rejects is left out rather than written, so that the output is always a
    /// header [`decode`] accepts; call `check` first to treat that as an error.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let len = self.encoded_len();
        out.reserve(len);
        out.extend_from_slice(&SIGNATURE);
        out.push(VERSION_2 << 4 | COMMAND_PROXY);
        // At most 36 + 3 + 255 + 3 + 128 bytes follow the fixed part, far below u16::MAX.
        let body_len = u16::try_from(len.saturating_sub(FIXED_LEN)).unwrap_or(u16::MAX);
        match self.addresses() {
            Addresses::V4(src, dst) => {
                out.push(FAMILY_TCP4);
                out.extend_from_slice(&body_len.to_be_bytes());
                out.extend_from_slice(&src.ip().octets());
                out.extend_from_slice(&dst.ip().octets());
                out.extend_from_slice(&src.port().to_be_bytes());
                out.extend_from_slice(&dst.port().to_be_bytes());
            }
            Addresses::V6(src, dst) => {
                out.push(FAMILY_TCP6);
                out.extend_from_slice(&body_len.to_be_bytes());
                out.extend_from_slice(&src.ip().octets());
                out.extend_from_slice(&dst.ip().octets());
                out.extend_from_slice(&src.port().to_be_bytes());
                out.extend_from_slice(&dst.port().to_be_bytes());
            }
        }
        for (tlv_type, value) in self.tlvs() {
            out.push(tlv_type);
            // `tlvs` only yields values within the bounds checked above.
            let value_len = u16::try_from(value.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&value_len.to_be_bytes());
            out.extend_from_slice(value);
        }
    }

    /// The number of bytes [`ProxyHeader::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        let addresses = match self.addresses() {
            Addresses::V4(..) => ADDRESSES_TCP4_LEN,
            Addresses::V6(..) => ADDRESSES_TCP6_LEN,
        };
        self.tlvs()
            .fold(FIXED_LEN.saturating_add(addresses), |len, (_, value)| {
                len.saturating_add(TLV_HEADER_LEN)
                    .saturating_add(value.len())
            })
    }

    /// Checks the TLV values against the bounds [`decode`] enforces: an authority of
    /// 1..=[`MAX_AUTHORITY_LEN`] bytes and a unique id of at most [`MAX_UNIQUE_ID_LEN`] bytes.
    pub fn check(&self) -> Result<(), ProxyError> {
        if let Some(authority) = &self.authority {
            check_authority(authority.as_bytes())?;
        }
        if let Some(unique_id) = &self.unique_id {
            check_unique_id(unique_id)?;
        }
        Ok(())
    }

    fn addresses(&self) -> Addresses {
        match (self.source, self.destination) {
            (SocketAddr::V4(src), SocketAddr::V4(dst)) => Addresses::V4(src, dst),
            (src, dst) => Addresses::V6(to_v6(src), to_v6(dst)),
        }
    }

    /// The TLVs to write, leaving out invalid values (see [`ProxyHeader::encode`]).
    fn tlvs(&self) -> impl Iterator<Item = (u8, &[u8])> {
        let authority = self
            .authority
            .as_deref()
            .map(str::as_bytes)
            .filter(|a| check_authority(a).is_ok())
            .map(|a| (PP2_TYPE_AUTHORITY, a));
        let unique_id = self
            .unique_id
            .as_deref()
            .filter(|id| check_unique_id(id).is_ok())
            .map(|id| (PP2_TYPE_UNIQUE_ID, id));
        authority.into_iter().chain(unique_id)
    }
}

enum Addresses {
    V4(SocketAddrV4, SocketAddrV4),
    V6(SocketAddrV6, SocketAddrV6),
}

fn to_v6(addr: SocketAddr) -> SocketAddrV6 {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    };
    SocketAddrV6::new(ip, addr.port(), 0, 0)
}

fn check_authority(value: &[u8]) -> Result<(), ProxyError> {
    let bad = |reason| ProxyError::BadTlv {
        tlv_type: PP2_TYPE_AUTHORITY,
        reason,
    };
    if value.is_empty() {
        return Err(bad("empty authority"));
    }
    if value.len() > MAX_AUTHORITY_LEN {
        return Err(bad("authority longer than 255 bytes"));
    }
    Ok(())
}

fn check_unique_id(value: &[u8]) -> Result<(), ProxyError> {
    if value.len() > MAX_UNIQUE_ID_LEN {
        return Err(ProxyError::BadTlv {
            tlv_type: PP2_TYPE_UNIQUE_ID,
            reason: "unique id longer than 128 bytes",
        });
    }
    Ok(())
}

/// Reads the PROXY v2 header at the start of `buf`, all bytes received on the connection so far.
///
/// Returns [`ProxyError::NeedMore`] while `buf` is a valid but incomplete beginning; every other answer
/// is final for any longer buffer. Bytes after the header (the payload) are not looked at.
pub fn decode(buf: &[u8]) -> Result<Decoded, ProxyError> {
    // Step 1: as much of the signature as has arrived must match.
    let arrived = buf.len().min(SIGNATURE.len());
    if buf.get(..arrived) != SIGNATURE.get(..arrived) {
        return Err(ProxyError::BadSignature);
    }
    // Step 2.
    let Some(&version_command) = buf.get(12) else {
        return Err(ProxyError::NeedMore);
    };
    let version = version_command >> 4;
    if version != VERSION_2 {
        return Err(ProxyError::BadVersion(version));
    }
    let command = version_command & 0x0f;
    if command != COMMAND_LOCAL && command != COMMAND_PROXY {
        return Err(ProxyError::BadCommand(command));
    }
    // Step 3: `None` means "skip the block and use the real endpoints".
    let Some(&family) = buf.get(13) else {
        return Err(ProxyError::NeedMore);
    };
    let addresses_len = match (command, family) {
        (COMMAND_LOCAL, _) | (_, FAMILY_UNSPEC) => None,
        (_, FAMILY_TCP4) => Some(ADDRESSES_TCP4_LEN),
        (_, FAMILY_TCP6) => Some(ADDRESSES_TCP6_LEN),
        (_, other) => return Err(ProxyError::UnsupportedFamily(other)),
    };
    // Step 4.
    let Some(&[hi, lo]) = buf.get(14..FIXED_LEN) else {
        return Err(ProxyError::NeedMore);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if addresses_len.is_some_and(|needed| len < needed) {
        return Err(ProxyError::Malformed {
            reason: "length shorter than the address block",
        });
    }
    // At most 16 + 65535: cannot overflow.
    let consumed = FIXED_LEN.saturating_add(len);
    let Some(block) = buf.get(FIXED_LEN..consumed) else {
        return Err(ProxyError::NeedMore);
    };
    let header = match addresses_len {
        None => return Ok(Decoded::Local { consumed }),
        Some(ADDRESSES_TCP4_LEN) => read_tcp4(block),
        Some(_) => read_tcp6(block),
    };
    let (source, destination, tlvs) = header.ok_or(ProxyError::Malformed {
        reason: "length shorter than the address block",
    })?;
    let (authority, unique_id) = read_tlvs(tlvs)?;
    Ok(Decoded::Proxy {
        header: ProxyHeader {
            source,
            destination,
            authority,
            unique_id,
        },
        consumed,
    })
}

/// Takes the next `N` bytes off the front of `rest`.
fn take<const N: usize>(rest: &mut &[u8]) -> Option<[u8; N]> {
    let (head, tail) = rest.split_first_chunk::<N>()?;
    *rest = tail;
    Some(*head)
}

/// Step 5 for TCP4: returns the addresses and the TLV bytes after them.
fn read_tcp4(mut block: &[u8]) -> Option<(SocketAddr, SocketAddr, &[u8])> {
    let src = Ipv4Addr::from(take::<4>(&mut block)?);
    let dst = Ipv4Addr::from(take::<4>(&mut block)?);
    let src_port = u16::from_be_bytes(take(&mut block)?);
    let dst_port = u16::from_be_bytes(take(&mut block)?);
    Some((
        SocketAddr::from((src, src_port)),
        SocketAddr::from((dst, dst_port)),
        block,
    ))
}

/// Step 5 for TCP6. IPv4-mapped addresses are returned as they were sent, as IPv6.
fn read_tcp6(mut block: &[u8]) -> Option<(SocketAddr, SocketAddr, &[u8])> {
    let src = Ipv6Addr::from(take::<16>(&mut block)?);
    let dst = Ipv6Addr::from(take::<16>(&mut block)?);
    let src_port = u16::from_be_bytes(take(&mut block)?);
    let dst_port = u16::from_be_bytes(take(&mut block)?);
    Some((
        SocketAddr::from((src, src_port)),
        SocketAddr::from((dst, dst_port)),
        block,
    ))
}

/// Step 6: reads the TLVs that fill the rest of the header.
fn read_tlvs(mut tlvs: &[u8]) -> Result<(Option<String>, Option<Vec<u8>>), ProxyError> {
    let (mut authority, mut unique_id) = (None, None);
    while let Some((&tlv_type, rest)) = tlvs.split_first() {
        let bad = |reason| ProxyError::BadTlv { tlv_type, reason };
        let Some((len, rest)) = rest.split_first_chunk::<2>() else {
            return Err(bad("truncated TLV header"));
        };
        let Some((value, rest)) = rest.split_at_checked(usize::from(u16::from_be_bytes(*len)))
        else {
            return Err(bad("TLV value overruns the header"));
        };
        tlvs = rest;
        match tlv_type {
            PP2_TYPE_AUTHORITY => {
                if authority.is_some() {
                    return Err(bad("duplicate TLV"));
                }
                check_authority(value)?;
                let value =
                    std::str::from_utf8(value).map_err(|_| bad("authority is not UTF-8"))?;
                authority = Some(value.to_owned());
            }
            PP2_TYPE_UNIQUE_ID => {
                if unique_id.is_some() {
                    return Err(bad("duplicate TLV"));
                }
                check_unique_id(value)?;
                unique_id = Some(value.to_vec());
            }
            // Unknown types, NOOP, SSL, NETNS, CRC32C (not verified: the spec makes checking it
            // conditional on the receiver supporting it).
            _ => {}
        }
    }
    Ok((authority, unique_id))
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used
)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn header(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader {
            source: v4(src),
            destination: v4(dst),
            authority: None,
            unique_id: None,
        }
    }

    fn encode(h: &ProxyHeader) -> Vec<u8> {
        let mut out = Vec::new();
        h.encode(&mut out);
        assert_eq!(out.len(), h.encoded_len());
        out
    }

    #[test]
    fn tcp4_round_trip_with_payload_after() {
        let h = ProxyHeader {
            authority: Some("app.kiln.test".into()),
            unique_id: Some(vec![1, 2, 3]),
            ..header("192.0.2.1:1234", "198.51.100.7:443")
        };
        let mut buf = encode(&h);
        let len = buf.len();
        buf.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            decode(&buf).unwrap(),
            Decoded::Proxy {
                header: h,
                consumed: len
            }
        );
    }

    #[test]
    fn mixed_families_are_sent_as_ipv4_mapped_tcp6() {
        let h = header("192.0.2.1:1234", "[2001:db8::1]:443");
        let buf = encode(&h);
        assert_eq!(buf[13], FAMILY_TCP6);
        let Decoded::Proxy { header: got, .. } = decode(&buf).unwrap() else {
            unreachable!()
        };
        assert_eq!(got.source, v4("[::ffff:192.0.2.1]:1234"));
        assert_eq!(got.destination, h.destination);
    }

    #[test]
    fn every_prefix_needs_more() {
        let buf = encode(&ProxyHeader {
            authority: Some("a.test".into()),
            ..header("[2001:db8::1]:1", "[2001:db8::2]:2")
        });
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Err(ProxyError::NeedMore), "cut {cut}");
        }
    }

    #[test]
    fn wrong_bytes_are_refused_as_they_arrive() {
        assert_eq!(decode(b"GET / HTTP/1.1"), Err(ProxyError::BadSignature));
        assert_eq!(decode(b"\r\n\r\n\0\r\nQUIX"), Err(ProxyError::BadSignature));
        let mut buf = SIGNATURE.to_vec();
        buf.push(0x11);
        assert_eq!(decode(&buf), Err(ProxyError::BadVersion(1)));
        buf[12] = 0x22;
        assert_eq!(decode(&buf), Err(ProxyError::BadCommand(2)));
        buf[12] = 0x21;
        for family in [0x12, 0x22, 0x31, 0x32, 0x10, 0x13, 0x41] {
            buf.truncate(13);
            buf.push(family);
            assert_eq!(decode(&buf), Err(ProxyError::UnsupportedFamily(family)));
        }
        buf[13] = FAMILY_TCP6;
        buf.extend([0, 35]);
        assert_eq!(
            decode(&buf),
            Err(ProxyError::Malformed {
                reason: "length shorter than the address block"
            })
        );
    }

    #[test]
    fn local_and_unspec_skip_the_block() {
        let mut buf = SIGNATURE.to_vec();
        // LOCAL with a nonsense family and 3 bytes of block: ignored, as the spec says.
        buf.extend([0x20, 0x77, 0, 3, 9, 9, 9, b'x']);
        assert_eq!(decode(&buf), Ok(Decoded::Local { consumed: 19 }));
        buf[12] = 0x21;
        buf[13] = FAMILY_UNSPEC;
        assert_eq!(decode(&buf), Ok(Decoded::Local { consumed: 19 }));
    }

    #[test]
    fn tlvs_are_validated_and_unknown_ones_skipped() {
        let base = encode(&header("192.0.2.1:1", "192.0.2.2:2"));
        let with_tlvs = |tlvs: &[u8]| {
            let mut buf = base.clone();
            buf.extend_from_slice(tlvs);
            let len = u16::try_from(buf.len() - 16).unwrap().to_be_bytes();
            buf[14..16].copy_from_slice(&len);
            decode(&buf)
        };
        let bad = |tlv_type, reason| Err(ProxyError::BadTlv { tlv_type, reason });
        assert!(matches!(
            with_tlvs(&[0x04, 0, 2, 0, 0, 0x20, 0, 0, 0x02, 0, 1, b'a']),
            Ok(Decoded::Proxy { header: ProxyHeader { authority: Some(a), .. }, .. }) if a == "a"
        ));
        assert_eq!(with_tlvs(&[0x02]), bad(2, "truncated TLV header"));
        assert_eq!(with_tlvs(&[0x04, 0]), bad(4, "truncated TLV header"));
        assert_eq!(
            with_tlvs(&[0x30, 0, 2, 0]),
            bad(0x30, "TLV value overruns the header")
        );
        assert_eq!(with_tlvs(&[0x02, 0, 0]), bad(2, "empty authority"));
        assert_eq!(
            with_tlvs(&[0x02, 0, 1, 0xff]),
            bad(2, "authority is not UTF-8")
        );
        assert_eq!(
            with_tlvs(&[0x05, 0, 0, 0x05, 0, 0]),
            bad(5, "duplicate TLV")
        );
        let mut long_id = vec![0x05, 0, 129];
        long_id.extend([0; 129]);
        assert_eq!(
            with_tlvs(&long_id),
            bad(5, "unique id longer than 128 bytes")
        );
    }

    #[test]
    fn invalid_tlvs_are_left_out_by_encode() {
        let h = ProxyHeader {
            authority: Some(String::new()),
            unique_id: Some(vec![0; 129]),
            ..header("192.0.2.1:1", "192.0.2.2:2")
        };
        assert!(h.check().is_err());
        assert_eq!(h.encoded_len(), 28);
        let Decoded::Proxy { header: got, .. } = decode(&encode(&h)).unwrap() else {
            unreachable!()
        };
        assert_eq!((got.authority, got.unique_id), (None, None));
    }
}
