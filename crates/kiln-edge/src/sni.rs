//! TLS ClientHello reader: the "peek" half of SNI passthrough.
//!
//! The edge never terminates TLS (ADR 0008). It reads the first bytes a client sends, takes the server
//! name (and the offered ALPN protocols) out of the ClientHello, picks a backend, and then forwards every
//! byte it read, untouched. This module is that read: one pure function over the bytes received so far.
//! It does no I/O, never panics, allocates only the fields it returns (plus a copy of a hello that
//! spans several records), and does work bounded by [`MAX_HELLO_BYTES`].
//!
//! # Walk-through
//! 1. **Records** (RFC 8446 §5.1). The connection opens with `TLSPlaintext` records:
//!    `content_type(1) = 22 handshake | legacy_record_version(2) = 0x03xx | length(2) | fragment`.
//!    A first byte other than 22, or a major version other than 3, means the peer does not speak TLS
//!    ([`HelloError::NotTls`]); this is decided from the first byte, so an HTTP or SSH client is turned
//!    away at once. Fragments are 1..=2^14 bytes; anything else is [`HelloError::Malformed`].
//! 2. **Reassembly.** The fragments of consecutive handshake records form one handshake stream. It must
//!    start with `msg_type(1) = 1 client_hello | length(3)` ([`HelloError::NotClientHello`] otherwise).
//!    A hello that cannot fit in [`MAX_HELLO_BYTES`], counting record headers, is
//!    [`HelloError::TooLarge`], reported as soon as a length field proves it. Reading stops at the last
//!    byte of the message: the rest of its record, and later records, are not waited for.
//! 3. **ClientHello body** (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2): `legacy_version(2) | random(32) |
//!    session_id<0..32> | cipher_suites<2..2^16-2> | compression_methods<1..2^8-1> | extensions<0..2^16-1>`.
//!    The extensions block is optional (pre-1.3 clients may omit it) and must end exactly where the
//!    message ends.
//! 4. **Extensions**: `server_name` (0, RFC 6066 §3) gives the host name, validated as an ASCII DNS name
//!    and lowercased; `application_layer_protocol_negotiation` (16, RFC 7301) the offered protocols;
//!    `supported_versions` (43, RFC 8446 §4.2.1) the offered versions. Unknown extensions and GREASE
//!    values (RFC 8701) are skipped. A repeated extension that we interpret is rejected: two different
//!    names in one hello would let the edge and the backend disagree about where a connection belongs.
//! 5. **Two bounds on every read.** Each field is checked first against the length its container
//!    declared (overrun: [`HelloError::Malformed`]) and then against the bytes received so far
//!    (shortfall: [`HelloError::NeedMore`]). Checking the declared bound first rejects garbage as soon as
//!    the offending length field arrives, instead of waiting for bytes that can never make it valid.
//!
//! # Calling it
//! Pass everything received on the connection so far, from its first byte. On
//! [`HelloError::NeedMore`], read more and call again with the longer buffer. Any other answer is final:
//! for a buffer `b` and any longer buffer `b'` that starts with `b`, the answer for `b` is either
//! `NeedMore` or exactly the answer for `b'`. Re-parsing from the start on every segment costs
//! O(n²) in the number of segments, which the 64 KiB bound keeps small, and keeps the parser stateless.

// The module promises totality: these lints turn "no unchecked indexing, no overflow" from a
// convention into something the compiler checks.
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::borrow::Cow;

/// The largest ClientHello the edge will buffer, counting TLS record headers.
///
/// Real hellos are 250 bytes to ~2 KiB (post-quantum key shares add ~1.2 KiB); 64 KiB leaves room for
/// anything legitimate while bounding the memory and time a client can make the edge spend before
/// it has identified itself.
pub const MAX_HELLO_BYTES: usize = 64 * 1024;

/// TLS record content type for handshake messages.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Record header: content type, version, length.
const RECORD_HEADER_LEN: usize = 5;
/// RFC 8446 §5.1: a plaintext fragment MUST NOT exceed 2^14 bytes.
const MAX_FRAGMENT_LEN: usize = 1 << 14;
/// Handshake header: msg_type, 24-bit length.
const HANDSHAKE_HEADER_LEN: usize = 4;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// RFC 1035 limits: a name is at most 253 characters in text form, a label at most 63.
const MAX_HOST_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// What the edge learns from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` from `server_name`, lowercased. `None` when the client sent no SNI (it connected
    /// to an IP address, or is very old): the caller routes by port or refuses.
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order of preference, GREASE removed. Empty when the client
    /// sent no ALPN extension.
    pub alpn: Vec<Vec<u8>>,
    /// The hello's `legacy_version` (0x0303 from TLS 1.2 and 1.3 clients).
    pub legacy_version: u16,
    /// `supported_versions` in the client's order, GREASE removed. Empty when absent, which means the
    /// client does not offer TLS 1.3.
    pub supported_versions: Vec<u16>,
    /// How many bytes from the start of the buffer carried the hello: record headers plus the
    /// handshake message, up to and including its last byte. Useful for logs and metrics; the edge
    /// still forwards every byte it received.
    pub wire_len: usize,
}

/// Why [`parse_client_hello`] did not return a hello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Not an error: the bytes so far are a valid beginning. Read more and call again.
    #[error("need more bytes to read the ClientHello")]
    NeedMore,
    /// The first record is not a TLS handshake record (wrong content type or version).
    #[error("not a TLS handshake")]
    NotTls,
    /// The first handshake message is not a ClientHello.
    #[error("first handshake message is type {msg_type}, not ClientHello")]
    NotClientHello {
        /// The handshake `msg_type` found instead of 1.
        msg_type: u8,
    },
    /// A length or value is inconsistent with its container or with the protocol.
    #[error("malformed ClientHello: {reason}")]
    Malformed {
        /// What was wrong, for logs.
        reason: &'static str,
    },
    /// The hello would need more than [`MAX_HELLO_BYTES`] bytes of the connection.
    #[error("ClientHello larger than {MAX_HELLO_BYTES} bytes")]
    TooLarge,
}

const fn malformed(reason: &'static str) -> HelloError {
    HelloError::Malformed { reason }
}

/// Reads the ClientHello at the start of `buf`, all bytes received from the client so far.
///
/// Returns [`HelloError::NeedMore`] while `buf` is a valid but incomplete beginning; every other answer
/// is final (see the module docs). Never panics, whatever `buf` holds.
pub fn parse_client_hello(buf: &[u8]) -> Result<ClientHello, HelloError> {
    let mut handshake: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut msg_len = None;
    // Steps 1-2: collect the handshake bytes; `walk` says why it stopped.
    let walk = reassemble(buf, &mut handshake, &mut msg_len);
    // Steps 3-5 run on whatever was collected, even if the walk stopped early: every collected byte
    // precedes the point where the walk stopped, so an error in them is the first error in the stream.
    // That ordering is what makes a prefix's answer agree with the full buffer's.
    let body = match msg_len {
        Some(msg_len) => parse_body(&handshake, msg_len),
        None => Err(HelloError::NeedMore),
    };
    match (body, walk) {
        (Ok(mut hello), Ok(wire_len)) => {
            hello.wire_len = wire_len;
            Ok(hello)
        }
        (Err(HelloError::NeedMore), walk) | (Ok(_), walk) => walk.and(Err(HelloError::NeedMore)),
        (Err(e), _) => Err(e),
    }
}

/// A complete TLS alert record: level fatal (2), description `unrecognized_name` (112), record version
/// 0x0303. The edge sends it when no route matches the SNI, so the client sees a TLS error rather
/// than a bare connection reset.
pub const fn unrecognized_name_alert() -> [u8; 7] {
    [21, 0x03, 0x03, 0x00, 0x02, 2, 112]
}

/// Steps 1-2: walks records from the start of `buf`, appending to `handshake` the fragment bytes of the
/// handshake stream, never more than the ClientHello message itself. Sets `msg_len` (header included)
/// once the handshake header is known and acceptable.
///
/// Returns the hello's `wire_len` once the whole message is in `handshake`, `NeedMore` when `buf` ends
/// first, or the first record-layer or handshake-header error.
fn reassemble<'a>(
    buf: &'a [u8],
    handshake: &mut Cow<'a, [u8]>,
    msg_len: &mut Option<usize>,
) -> Result<usize, HelloError> {
    // Offset of the current record's header. Every offset below stays <= MAX_HELLO_BYTES + 2^14 + 5
    // (checked before use), so saturating arithmetic never actually saturates.
    let mut pos = 0usize;
    loop {
        // The message is incomplete, so another record is needed: it costs a header and at least one
        // byte of fragment, and must fit the budget.
        if pos.saturating_add(RECORD_HEADER_LEN + 1) > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        let record = buf.get(pos..).unwrap_or_default();
        let record_len = record_header(record, pos == 0)?;
        let fragment_start = pos.saturating_add(RECORD_HEADER_LEN);
        let available = buf.get(fragment_start..).unwrap_or_default();
        let available = available.get(..record_len).unwrap_or(available);

        let mut used = 0usize;
        loop {
            let wanted = match *msg_len {
                Some(total) => total.saturating_sub(handshake.len()),
                None => HANDSHAKE_HEADER_LEN.saturating_sub(handshake.len()),
            };
            if wanted == 0 {
                // Only reachable with `msg_len` set: the whole message is here.
                return Ok(fragment_start.saturating_add(used));
            }
            let left_in_record = record_len.saturating_sub(used);
            if left_in_record == 0 {
                break;
            }
            // The rest of the message ends at this offset at the earliest (later records only add
            // headers), so this is the earliest moment the budget can be known to be blown.
            if fragment_start.saturating_add(used).saturating_add(wanted) > MAX_HELLO_BYTES {
                return Err(HelloError::TooLarge);
            }
            let take = wanted.min(left_in_record);
            let fresh = available.get(used..).unwrap_or_default();
            let fresh = fresh.get(..take).unwrap_or(fresh);
            append(handshake, fresh);
            used = used.saturating_add(fresh.len());
            check_handshake_header(handshake, msg_len)?;
            if fresh.len() < take {
                return Err(HelloError::NeedMore);
            }
        }
        pos = fragment_start.saturating_add(record_len);
    }
}

/// Validates the record header at the start of `record` as far as its bytes are present, and returns
/// the fragment length. Each byte is judged as soon as it arrives so that non-TLS peers are refused
/// on their first byte.
fn record_header(record: &[u8], first: bool) -> Result<usize, HelloError> {
    // The first record decides "is this TLS at all"; a later bad record is a broken TLS client.
    let not_handshake = if first {
        HelloError::NotTls
    } else {
        malformed("non-handshake record before the end of the ClientHello")
    };
    if record.first().is_some_and(|&t| t != CONTENT_TYPE_HANDSHAKE) {
        return Err(not_handshake);
    }
    // Every TLS and SSL 3 version is 3.x; clients put 3.0..=3.3 here. Like rustls, accept any minor.
    if record.get(1).is_some_and(|&major| major != 3) {
        return Err(if first {
            HelloError::NotTls
        } else {
            malformed("record version is not 3.x")
        });
    }
    let Some(&[hi, lo]) = record.get(3..RECORD_HEADER_LEN) else {
        return Err(HelloError::NeedMore);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len == 0 {
        // RFC 8446 §5.1: zero-length handshake fragments are forbidden; allowing them would let a
        // client hold the edge with an endless stream of empty records.
        return Err(malformed("empty handshake record"));
    }
    if len > MAX_FRAGMENT_LEN {
        return Err(malformed("record longer than 2^14 bytes"));
    }
    Ok(len)
}

/// Appends without copying in the common case: a hello in one record stays a borrowed slice.
fn append<'a>(handshake: &mut Cow<'a, [u8]>, more: &'a [u8]) {
    if more.is_empty() {
        return;
    }
    if handshake.is_empty() {
        *handshake = Cow::Borrowed(more);
    } else {
        handshake.to_mut().extend_from_slice(more);
    }
}

/// Judges the handshake header as its bytes arrive: the type on the first byte, the length on the fourth.
fn check_handshake_header(handshake: &[u8], msg_len: &mut Option<usize>) -> Result<(), HelloError> {
    if msg_len.is_some() {
        return Ok(());
    }
    if let Some(&msg_type) = handshake.first() {
        if msg_type != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::NotClientHello { msg_type });
        }
    }
    if let Some(&[_, a, b, c]) = handshake.get(..HANDSHAKE_HEADER_LEN) {
        let body_len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        // At most 4 + (2^24 - 1): cannot overflow.
        let total = HANDSHAKE_HEADER_LEN.saturating_add(body_len);
        if total > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        *msg_len = Some(total);
    }
    Ok(())
}

/// A cursor over `buf[pos..end]`, where `end` is the length the container declared and `buf` holds
/// the bytes received so far, which may stop before `end`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    fn remaining(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }

    /// Advances past `n` declared bytes without needing them to have arrived: used for fields whose
    /// content is skipped. The caller's final completeness check covers their arrival.
    fn skip(&mut self, n: usize, overrun: &'static str) -> Result<Reader<'a>, HelloError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.end)
            .ok_or(malformed(overrun))?;
        let sub = Reader {
            buf: self.buf,
            pos: self.pos,
            end,
        };
        self.pos = end;
        Ok(sub)
    }

    /// Returns the next `n` bytes: `Malformed` if they overrun the container, `NeedMore` if they have
    /// not arrived yet (in that order, see step 5).
    fn bytes(&mut self, n: usize, overrun: &'static str) -> Result<&'a [u8], HelloError> {
        let sub = self.skip(n, overrun)?;
        sub.buf.get(sub.pos..sub.end).ok_or(HelloError::NeedMore)
    }

    fn rest(&mut self) -> Result<&'a [u8], HelloError> {
        self.bytes(self.remaining(), "unreachable: rest of a container")
    }

    fn u8(&mut self, overrun: &'static str) -> Result<u8, HelloError> {
        match self.bytes(1, overrun)? {
            &[b] => Ok(b),
            _ => Err(malformed(overrun)),
        }
    }

    fn u16(&mut self, overrun: &'static str) -> Result<u16, HelloError> {
        match self.bytes(2, overrun)? {
            &[hi, lo] => Ok(u16::from_be_bytes([hi, lo])),
            _ => Err(malformed(overrun)),
        }
    }

    /// A vector with a one-byte length prefix (`<0..2^8-1>` in the TLS presentation language).
    fn vec8(&mut self, overrun: &'static str) -> Result<Reader<'a>, HelloError> {
        let n = self.u8(overrun)?;
        self.skip(usize::from(n), overrun)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, overrun: &'static str) -> Result<Reader<'a>, HelloError> {
        let n = self.u16(overrun)?;
        self.skip(usize::from(n), overrun)
    }

    fn expect_end(&self, trailing: &'static str) -> Result<(), HelloError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(malformed(trailing))
        }
    }
}

/// Steps 3-4: the ClientHello body. `handshake` holds the bytes collected so far (header included),
/// `msg_len` the declared message length. Returns `NeedMore` if a needed byte has not arrived.
fn parse_body(handshake: &[u8], msg_len: usize) -> Result<ClientHello, HelloError> {
    let mut r = Reader {
        buf: handshake,
        pos: HANDSHAKE_HEADER_LEN,
        end: msg_len,
    };
    let legacy_version = r.u16("ClientHello too short for legacy_version")?;
    if legacy_version >> 8 != 3 {
        return Err(malformed("legacy_version is not 3.x"));
    }
    r.skip(32, "ClientHello too short for random")?;
    let session_id = r.vec8("session_id overruns the ClientHello")?;
    if session_id.remaining() > 32 {
        return Err(malformed("session_id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher_suites overrun the ClientHello")?;
    if suites.remaining() < 2 || suites.remaining() % 2 != 0 {
        return Err(malformed(
            "cipher_suites length is not a positive even number",
        ));
    }
    let compression = r.vec8("compression_methods overrun the ClientHello")?;
    if compression.is_empty() {
        return Err(malformed("no compression methods"));
    }

    let mut hello = ClientHello {
        sni: None,
        alpn: Vec::new(),
        legacy_version,
        supported_versions: Vec::new(),
        wire_len: 0,
    };
    if r.is_empty() {
        // No extensions block: legal before TLS 1.3.
        return Ok(hello);
    }
    let mut extensions = r.vec16("extensions overrun the ClientHello")?;
    r.expect_end("bytes after the extensions block")?;

    let (mut seen_sni, mut seen_alpn, mut seen_versions) = (false, false, false);
    while !extensions.is_empty() {
        let ext_type = extensions.u16("truncated extension header")?;
        let mut data = extensions.vec16("extension overruns the extensions block")?;
        match ext_type {
            EXT_SERVER_NAME => {
                once(&mut seen_sni, "duplicate server_name extension")?;
                hello.sni = server_name(&mut data)?;
            }
            EXT_ALPN => {
                once(&mut seen_alpn, "duplicate ALPN extension")?;
                hello.alpn = alpn(&mut data)?;
            }
            EXT_SUPPORTED_VERSIONS => {
                once(&mut seen_versions, "duplicate supported_versions extension")?;
                hello.supported_versions = supported_versions(&mut data)?;
            }
            // Unknown and GREASE extensions: `vec16` already stepped over the data.
            _ => {}
        }
    }
    Ok(hello)
}

fn once(seen: &mut bool, duplicate: &'static str) -> Result<(), HelloError> {
    if std::mem::replace(seen, true) {
        Err(malformed(duplicate))
    } else {
        Ok(())
    }
}

/// RFC 6066 §3: `ServerNameList server_name_list<1..2^16-1>` of `name_type(1) | opaque<1..2^16-1>`.
fn server_name(data: &mut Reader<'_>) -> Result<Option<String>, HelloError> {
    let mut list = data.vec16("server_name_list overruns the extension")?;
    data.expect_end("bytes after server_name_list")?;
    if list.is_empty() {
        return Err(malformed("empty server_name_list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("truncated server name entry")?;
        let mut name = list.vec16("server name overruns server_name_list")?;
        // Only host_name is defined. Every deployed implementation frames other types with the same
        // two-byte length, so skipping them is safe and keeps future types from breaking routing.
        if name_type == NAME_TYPE_HOST_NAME {
            if host.is_some() {
                return Err(malformed("more than one host_name"));
            }
            host = Some(host_name(name.rest()?)?);
        }
    }
    Ok(host)
}

/// Validates an SNI host name (ASCII letters, digits, `-` and `_`; labels of 1..=63 bytes not starting
/// or ending with `-`; no trailing dot, per RFC 6066) and returns it lowercased.
///
/// Underscores are not valid in host names, but appear in real ones and clients send them; routing,
/// not parsing, decides whether such a name matches anything.
fn host_name(raw: &[u8]) -> Result<String, HelloError> {
    if raw.is_empty() {
        return Err(malformed("empty host_name"));
    }
    if raw.len() > MAX_HOST_NAME_LEN {
        return Err(malformed("host_name longer than 253 bytes"));
    }
    for label in raw.split(|&b| b == b'.') {
        if label.is_empty() {
            return Err(malformed("empty label in host_name"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(malformed("host_name label longer than 63 bytes"));
        }
        if !label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(malformed("invalid character in host_name"));
        }
        if label.first() == Some(&b'-') || label.last() == Some(&b'-') {
            return Err(malformed("host_name label starts or ends with '-'"));
        }
    }
    Ok(raw
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// RFC 7301 §3.1: `ProtocolName protocol_name_list<2..2^16-1>`, `ProtocolName opaque<1..2^8-1>`.
fn alpn(data: &mut Reader<'_>) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut list = data.vec16("ALPN list overruns the extension")?;
    data.expect_end("bytes after the ALPN list")?;
    if list.is_empty() {
        return Err(malformed("empty ALPN list"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.vec8("ALPN protocol name overruns the list")?.rest()?;
        if name.is_empty() {
            return Err(malformed("empty ALPN protocol name"));
        }
        // RFC 8701 §3: GREASE ALPN identifiers are the two-byte strings 0x?A?A.
        let grease = matches!(name, &[a, b] if is_grease(u16::from_be_bytes([a, b])));
        if !grease {
            protocols.push(name.to_vec());
        }
    }
    Ok(protocols)
}

/// RFC 8446 §4.2.1: `ProtocolVersion versions<2..254>` in a ClientHello.
fn supported_versions(data: &mut Reader<'_>) -> Result<Vec<u16>, HelloError> {
    let mut list = data.vec8("supported_versions overrun the extension")?;
    data.expect_end("bytes after supported_versions")?;
    if list.remaining() < 2 || list.remaining() % 2 != 0 {
        return Err(malformed(
            "supported_versions length is not a positive even number",
        ));
    }
    let mut versions = Vec::new();
    while !list.is_empty() {
        let version = list.u16("truncated supported version")?;
        if !is_grease(version) {
            versions.push(version);
        }
    }
    Ok(versions)
}

/// RFC 8701 §2: GREASE values are 0x0A0A, 0x1A1A, ..., 0xFAFA.
const fn is_grease(value: u16) -> bool {
    value & 0x0f0f == 0x0a0a && value >> 8 == value & 0xff
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used
)]
mod tests {
    use super::*;

    fn u16be(v: usize) -> [u8; 2] {
        u16::try_from(v).unwrap().to_be_bytes()
    }

    fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut out = ty.to_be_bytes().to_vec();
        out.extend(u16be(data.len()));
        out.extend(data);
        out
    }

    fn sni_ext(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![0];
        entry.extend(u16be(name.len()));
        entry.extend(name);
        let mut list = u16be(entry.len()).to_vec();
        list.extend(entry);
        ext(EXT_SERVER_NAME, &list)
    }

    /// A ClientHello handshake message (header included) with the given extensions block, or none.
    fn hello_msg(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
        if let Some(exts) = extensions {
            body.extend(u16be(exts.len()));
            body.extend(exts);
        }
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut msg = vec![1, len[1], len[2], len[3]];
        msg.extend(body);
        msg
    }

    fn record(fragment: &[u8]) -> Vec<u8> {
        let mut out = vec![22, 3, 1];
        out.extend(u16be(fragment.len()));
        out.extend(fragment);
        out
    }

    fn hello_with_sni(name: &[u8]) -> Vec<u8> {
        record(&hello_msg(Some(&sni_ext(name))))
    }

    #[test]
    fn reads_sni_and_lowercases_it() {
        let buf = hello_with_sni(b"App.Kiln.TEST");
        let hello = parse_client_hello(&buf).unwrap();
        assert_eq!(hello.sni.as_deref(), Some("app.kiln.test"));
        assert_eq!(hello.wire_len, buf.len());
        assert_eq!(hello.legacy_version, 0x0303);
    }

    #[test]
    fn hello_without_extensions_has_no_sni() {
        let hello = parse_client_hello(&record(&hello_msg(None))).unwrap();
        assert_eq!(hello.sni, None);
        assert!(hello.alpn.is_empty());
    }

    #[test]
    fn empty_buffer_needs_more() {
        assert_eq!(parse_client_hello(&[]), Err(HelloError::NeedMore));
    }

    #[test]
    fn non_tls_is_refused_on_the_first_byte() {
        assert_eq!(parse_client_hello(b"G"), Err(HelloError::NotTls));
        assert_eq!(parse_client_hello(b"SSH-2.0"), Err(HelloError::NotTls));
        // SSLv2-compatible hello framing.
        assert_eq!(parse_client_hello(&[0x80, 0x2e]), Err(HelloError::NotTls));
        assert_eq!(parse_client_hello(&[22, 2]), Err(HelloError::NotTls));
    }

    #[test]
    fn non_hello_handshake_is_refused_on_its_type_byte() {
        assert_eq!(
            parse_client_hello(&[22, 3, 3, 0, 40, 2]),
            Err(HelloError::NotClientHello { msg_type: 2 })
        );
    }

    #[test]
    fn huge_declared_hello_is_too_large_before_its_bytes_arrive() {
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff]),
            Err(HelloError::TooLarge)
        );
        // The budget counts the record header too: the largest message is MAX_HELLO_BYTES - 5.
        let declare = |msg_len: usize| {
            let b = u32::try_from(msg_len - 4).unwrap().to_be_bytes();
            parse_client_hello(&[22, 3, 1, 0x40, 0, 1, b[1], b[2], b[3]])
        };
        assert_eq!(declare(MAX_HELLO_BYTES - 4), Err(HelloError::TooLarge));
        assert_eq!(declare(MAX_HELLO_BYTES - 5), Err(HelloError::NeedMore));
    }

    #[test]
    fn record_lengths_are_checked() {
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0, 0]),
            Err(malformed("empty handshake record"))
        );
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0x40, 1]),
            Err(malformed("record longer than 2^14 bytes"))
        );
    }

    #[test]
    fn overlong_inner_length_is_rejected_before_the_rest_arrives() {
        let mut buf = hello_with_sni(b"a.test");
        // The session id length (after 5 record + 4 handshake + 2 version + 32 random bytes) claims
        // more than the whole message: judged on arrival, not after the rest of the hello.
        let at = 5 + 4 + 2 + 32;
        buf[at] = 200;
        assert_eq!(
            parse_client_hello(&buf[..=at]),
            Err(malformed("session_id overruns the ClientHello"))
        );
        assert_eq!(parse_client_hello(&buf[..at]), Err(HelloError::NeedMore));
    }

    #[test]
    fn host_names_are_validated() {
        for bad in [
            &b""[..],
            b".",
            b"a..b",
            b"trailing.dot.",
            b"-lead.test",
            b"trail-.test",
            b"sp ace.test",
            b"caf\xc3\xa9.test",
            b"nul\0.test",
            b"a/b",
        ] {
            assert!(host_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(host_name(&[b'a'; 64]).is_err());
        let long: Vec<u8> = [
            &[b'a'; 63][..],
            b".",
            &[b'b'; 63],
            b".",
            &[b'c'; 63],
            b".",
            &[b'd'; 63],
        ]
        .concat();
        assert_eq!(long.len(), 255);
        assert!(host_name(&long).is_err());
        assert!(host_name(&long[..254]).is_err());
        assert!(host_name(&long[..253]).is_ok());
        assert_eq!(
            host_name(b"xn--bcher-kva.Example_1.test").unwrap(),
            "xn--bcher-kva.example_1.test"
        );
        assert_eq!(host_name(b"localhost").unwrap(), "localhost");
    }

    #[test]
    fn duplicate_server_name_is_rejected() {
        let mut exts = sni_ext(b"a.test");
        exts.extend(sni_ext(b"b.test"));
        assert_eq!(
            parse_client_hello(&record(&hello_msg(Some(&exts)))),
            Err(malformed("duplicate server_name extension"))
        );
    }

    #[test]
    fn grease_is_skipped() {
        let mut exts = ext(0x1a1a, &[]);
        exts.extend(ext(EXT_ALPN, &[0, 6, 2, 0x2a, 0x2a, 2, b'h', b'2']));
        exts.extend(ext(EXT_SUPPORTED_VERSIONS, &[4, 0x3a, 0x3a, 3, 4]));
        exts.extend(sni_ext(b"a.test"));
        let hello = parse_client_hello(&record(&hello_msg(Some(&exts)))).unwrap();
        assert_eq!(hello.alpn, vec![b"h2".to_vec()]);
        assert_eq!(hello.supported_versions, vec![0x0304]);
        assert!(is_grease(0xfafa) && !is_grease(0x0a1a) && !is_grease(0x1301));
    }

    #[test]
    fn trailing_bytes_after_extensions_are_rejected() {
        let mut msg = hello_msg(Some(&sni_ext(b"a.test")));
        msg.push(0);
        msg[3] += 1;
        assert_eq!(
            parse_client_hello(&record(&msg)),
            Err(malformed("bytes after the extensions block"))
        );
    }

    #[test]
    fn alert_is_fatal_unrecognized_name() {
        assert_eq!(
            unrecognized_name_alert(),
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70]
        );
    }
}
