//! DNS, as much as custom domains need: the [`Hostname`] a tenant may claim, and a codec for one
//! TXT question and its answer (RFC 1035 §4.1), which the control plane sends over UDP (TCP when
//! the answer is truncated) to prove that a tenant controls a domain.
//!
//! The exchange, step by step:
//! 1. [`txt_query`] encodes a query (`RD` set, one question `<name> IN TXT`).
//! 2. The resolver's answer is untrusted bytes: [`parse_response`] is total (never panics; its
//!    lints deny indexing, overflow and panics) and bounded: names are at most 255 bytes and every
//!    compression pointer must point before the previous one, so pointer loops cannot exist.
//! 3. [`Response::txt_for`] follows CNAMEs from the question's name (at most 8) and returns the
//!    TXT strings found at the end, so a challenge name may be delegated with a CNAME.
//!
//! No I/O here: sockets, timeouts and retries are the caller's.

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A custom hostname an app may claim: a lowercase DNS name of at least two labels, letters,
/// digits and inner hyphens only, at most 253 characters; never an IP literal (the last label is
/// never all digits). Or a wildcard `*.<name>` over such a name: it stands for any one label in
/// front of the name (`*.example.com` covers `a.example.com`, not `a.b.example.com`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(value_type = String, example = "www.example.com"))]
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hostname(String);

/// Why a hostname was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    #[error("is empty")]
    Empty,
    #[error("is longer than 253 characters")]
    TooLong,
    #[error("has a '*' other than a whole first label (`*.example.com`)")]
    Wildcard,
    #[error("is a single label; use a full DNS name like \"www.example.com\"")]
    SingleLabel,
    #[error("has a label of {len} characters (1 to 63)")]
    LabelLength { len: usize },
    #[error("contains {ch:?}; use lowercase letters, digits, '-' and '.'")]
    BadChar { ch: char },
    #[error("has a label {label:?} starting or ending with '-'")]
    Hyphen { label: String },
    #[error("is an IP address, not a DNS name")]
    IpLiteral,
}

impl Hostname {
    pub const MAX_LEN: usize = 253;

    /// Lowercases, drops one trailing dot, then validates: what a person typed, made canonical.
    pub fn normalize(input: &str) -> Result<Self, HostnameError> {
        let s = input.trim().to_ascii_lowercase();
        let s = s.strip_suffix('.').unwrap_or(&s);
        s.parse()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a wildcard (`*.example.com`).
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// The name without a wildcard label: `example.com` for `*.example.com`.
    pub fn base(&self) -> &str {
        self.0.strip_prefix("*.").unwrap_or(&self.0)
    }

    /// Whether this is `domain` itself or a name under it (`a.b.example.com` is under
    /// `example.com`; `badexample.com` is not). A wildcard is within `domain` when its base is.
    pub fn is_within(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        let base = self.base();
        base == domain
            || base
                .strip_suffix(domain)
                .is_some_and(|rest| rest.ends_with('.'))
    }

    /// The name whose TXT record proves ownership: `_kiln-challenge.<hostname>`, and for a
    /// wildcard `_kiln-challenge.<base>` (as ACME does): control of the zone proves both.
    pub fn challenge_name(&self) -> String {
        format!("{CHALLENGE_LABEL}.{}", self.base())
    }
}

/// The first label of the ownership challenge record.
pub const CHALLENGE_LABEL: &str = "_kiln-challenge";
/// What the challenge TXT record holds before the token: `kiln-verify=<token>`.
pub const CHALLENGE_PREFIX: &str = "kiln-verify=";

impl FromStr for Hostname {
    type Err = HostnameError;
    fn from_str(s: &str) -> Result<Self, HostnameError> {
        if s.is_empty() {
            return Err(HostnameError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(HostnameError::TooLong);
        }
        let (wildcard, s) = match s.strip_prefix("*.") {
            Some(base) => (true, base),
            None => (false, s),
        };
        if !s.contains('.') {
            return Err(HostnameError::SingleLabel);
        }
        let mut last = "";
        for label in s.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(HostnameError::LabelLength { len: label.len() });
            }
            if label.contains('*') {
                return Err(HostnameError::Wildcard);
            }
            if let Some(ch) = label
                .chars()
                .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
            {
                return Err(HostnameError::BadChar { ch });
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(HostnameError::Hyphen {
                    label: label.to_owned(),
                });
            }
            last = label;
        }
        if last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HostnameError::IpLiteral);
        }
        Ok(Self(if wildcard {
            format!("*.{s}")
        } else {
            s.to_owned()
        }))
    }
}

impl TryFrom<String> for Hostname {
    type Error = HostnameError;
    fn try_from(s: String) -> Result<Self, HostnameError> {
        s.parse()
    }
}

impl From<Hostname> for String {
    fn from(n: Hostname) -> String {
        n.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// RR type TXT.
pub const TYPE_TXT: u16 = 16;
/// RR type CNAME.
pub const TYPE_CNAME: u16 = 5;
/// Class IN.
pub const CLASS_IN: u16 = 1;
/// The largest answer read over UDP (EDNS is not used, so servers keep to 512; a larger buffer
/// costs nothing and tolerates servers that ignore the limit).
pub const UDP_MAX: usize = 4096;
/// Longest name on the wire (RFC 1035 §2.3.4).
const NAME_MAX: usize = 255;
/// Most CNAMEs followed from the question's name.
const CNAME_HOPS: usize = 8;

/// A response code (RFC 1035 §4.1.1, RFC 6895).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rcode(pub u8);

impl Rcode {
    pub const NOERROR: Rcode = Rcode(0);
    pub const NXDOMAIN: Rcode = Rcode(3);

    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "NOERROR",
            1 => "FORMERR",
            2 => "SERVFAIL",
            3 => "NXDOMAIN",
            4 => "NOTIMP",
            5 => "REFUSED",
            _ => "RCODE",
        }
    }
}

impl fmt::Display for Rcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            "RCODE" => write!(f, "RCODE{}", self.0),
            n => f.write_str(n),
        }
    }
}

/// A DNS message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("the name {name:?} cannot be put in a query (labels 1 to 63 bytes, 255 in all)")]
    BadQueryName { name: String },
    #[error("the message ends at byte {len}, inside {what}")]
    Short { what: &'static str, len: usize },
    #[error("the message is a query, not a response")]
    NotAResponse,
    #[error("a name uses the reserved label type 0x{bits:02x}")]
    LabelType { bits: u8 },
    #[error("a compression pointer to {to} does not point before the previous one")]
    BadPointer { to: usize },
    #[error("a name is longer than 255 bytes")]
    NameTooLong,
    #[error("a TXT record's strings overrun its data")]
    BadTxt,
}

/// A name read from a message: its labels, lowercased (names compare case-insensitively).
pub type Name = Vec<Vec<u8>>;

/// The parts of a response that verification looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    pub rcode: Rcode,
    /// `TC`: the answer did not fit; ask again over TCP.
    pub truncated: bool,
    /// The first question's name, if any (a response repeats the query's question).
    pub question: Option<Name>,
    /// TXT records of class IN: owner name and the record's strings, concatenated.
    pub txt: Vec<(Name, Vec<u8>)>,
    /// CNAME records of class IN: owner name and target.
    pub cnames: Vec<(Name, Name)>,
}

/// Splits a dotted name into lowercased labels (no escapes: the names Kiln asks for are
/// hostnames with a `_kiln-challenge` label in front).
pub fn name_of(dotted: &str) -> Name {
    dotted
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_ascii_lowercase())
        .collect()
}

/// Formats a name for people: labels joined by dots, bytes outside printable ASCII escaped.
pub fn display_name(name: &Name) -> String {
    let mut out = String::new();
    for label in name {
        for &b in label {
            if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\{b:03}"));
            }
        }
        out.push('.');
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// Encodes a recursive query for `<name> IN TXT` with transaction id `id`.
pub fn txt_query(id: u16, name: &str) -> Result<Vec<u8>, DnsError> {
    let bad = || DnsError::BadQueryName {
        name: name.to_owned(),
    };
    let labels = name_of(name);
    let mut msg = Vec::with_capacity(18usize.saturating_add(name.len()));
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&[0x01, 0x00]); // RD
    msg.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1
    let mut wire_len = 1usize;
    for label in &labels {
        let len = u8::try_from(label.len()).map_err(|_| bad())?;
        if len == 0 || len > 63 {
            return Err(bad());
        }
        wire_len = wire_len.saturating_add(label.len()).saturating_add(1);
        msg.push(len);
        msg.extend_from_slice(label);
    }
    if labels.is_empty() || wire_len > NAME_MAX {
        return Err(bad());
    }
    msg.push(0);
    msg.extend_from_slice(&TYPE_TXT.to_be_bytes());
    msg.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(msg)
}

/// A cursor over an untrusted message.
struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DnsError> {
        let short = DnsError::Short {
            what,
            len: self.msg.len(),
        };
        let end = self.pos.checked_add(n).ok_or(short.clone())?;
        let bytes = self.msg.get(self.pos..end).ok_or(short)?;
        self.pos = end;
        Ok(bytes)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DnsError> {
        let b = self.take(2, what)?;
        match b {
            [hi, lo] => Ok(u16::from_be_bytes([*hi, *lo])),
            _ => Err(DnsError::Short {
                what,
                len: self.msg.len(),
            }),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DnsError> {
        match self.take(1, what)? {
            [b] => Ok(*b),
            _ => Err(DnsError::Short {
                what,
                len: self.msg.len(),
            }),
        }
    }

    /// Reads a possibly compressed name at the cursor; the cursor ends after the name's bytes
    /// at this position (a pointer counts as its two bytes).
    fn name(&mut self) -> Result<Name, DnsError> {
        let mut labels = Name::new();
        let mut wire_len = 1usize;
        // Where reading continues after a pointer; `None` until the first pointer is followed.
        let mut resume: Option<usize> = None;
        // Every pointer must point before the one followed last (or before the name's start),
        // so each jump goes strictly backwards: no loop can exist.
        let mut limit = self.pos;
        loop {
            let len = self.u8("a name")?;
            match len & 0xC0 {
                0x00 if len == 0 => break,
                0x00 => {
                    let label = self.take(usize::from(len), "a label")?;
                    wire_len = wire_len.saturating_add(usize::from(len)).saturating_add(1);
                    if wire_len > NAME_MAX {
                        return Err(DnsError::NameTooLong);
                    }
                    labels.push(label.to_ascii_lowercase());
                }
                0xC0 => {
                    let low = self.u8("a compression pointer")?;
                    let to = usize::from(u16::from_be_bytes([len & 0x3F, low]));
                    // The pointer's own first byte is at pos - 2.
                    let at = self.pos.saturating_sub(2);
                    if to >= limit || to >= at {
                        return Err(DnsError::BadPointer { to });
                    }
                    limit = to;
                    if resume.is_none() {
                        resume = Some(self.pos);
                    }
                    self.pos = to;
                }
                bits => return Err(DnsError::LabelType { bits }),
            }
        }
        if let Some(pos) = resume {
            self.pos = pos;
        }
        Ok(labels)
    }
}

/// Decodes a response. Total and bounded: any bytes give a [`Response`] or a [`DnsError`].
/// Records after the answer section (authority, additional) are not read.
pub fn parse_response(msg: &[u8]) -> Result<Response, DnsError> {
    let mut r = Reader { msg, pos: 0 };
    let id = r.u16("the header")?;
    let flags = r.u16("the header")?;
    let qdcount = r.u16("the header")?;
    let ancount = r.u16("the header")?;
    let _nscount = r.u16("the header")?;
    let _arcount = r.u16("the header")?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::NotAResponse);
    }
    let truncated = flags & 0x0200 != 0;
    let rcode = Rcode((flags & 0x000F) as u8);
    let mut response = Response {
        id,
        rcode,
        truncated,
        question: None,
        txt: Vec::new(),
        cnames: Vec::new(),
    };
    // Each question takes at least 5 bytes and each record at least 11, so the loops end with
    // the message even when the counts lie. A truncated response may stop anywhere: keep what
    // was read whole.
    for _ in 0..qdcount {
        let name = match r.name() {
            Ok(n) => n,
            Err(_) if truncated => return Ok(response),
            Err(e) => return Err(e),
        };
        if let Err(e) = r.take(4, "a question") {
            return if truncated { Ok(response) } else { Err(e) };
        }
        if response.question.is_none() {
            response.question = Some(name);
        }
    }
    for _ in 0..ancount {
        match record(&mut r) {
            Ok(Some(Record::Txt(owner, text))) => response.txt.push((owner, text)),
            Ok(Some(Record::Cname(owner, target))) => response.cnames.push((owner, target)),
            Ok(None) => {}
            Err(_) if truncated => return Ok(response),
            Err(e) => return Err(e),
        }
    }
    Ok(response)
}

enum Record {
    Txt(Name, Vec<u8>),
    Cname(Name, Name),
}

fn record(r: &mut Reader<'_>) -> Result<Option<Record>, DnsError> {
    let owner = r.name()?;
    let rtype = r.u16("a record")?;
    let class = r.u16("a record")?;
    let _ttl = r.take(4, "a record")?;
    let rdlength = usize::from(r.u16("a record")?);
    let start = r.pos;
    let rdata = r.take(rdlength, "a record's data")?;
    if class != CLASS_IN {
        return Ok(None);
    }
    match rtype {
        TYPE_TXT => {
            let mut text = Vec::with_capacity(rdata.len());
            let mut rest = rdata;
            while let Some((&len, tail)) = rest.split_first() {
                let s = tail.get(..usize::from(len)).ok_or(DnsError::BadTxt)?;
                text.extend_from_slice(s);
                rest = tail.get(usize::from(len)..).ok_or(DnsError::BadTxt)?;
            }
            Ok(Some(Record::Txt(owner, text)))
        }
        TYPE_CNAME => {
            // The target may be compressed: read it in the whole message, then check that it
            // stayed within the record's data.
            let end = r.pos;
            r.pos = start;
            let target = r.name()?;
            if r.pos != end {
                r.pos = end;
                return Err(DnsError::Short {
                    what: "a CNAME's data",
                    len: r.msg.len(),
                });
            }
            Ok(Some(Record::Cname(owner, target)))
        }
        _ => Ok(None),
    }
}

impl Response {
    /// The TXT strings published at `name`, following CNAMEs from it (at most 8).
    pub fn txt_for(&self, name: &Name) -> Vec<&[u8]> {
        let mut at = name;
        for _ in 0..=CNAME_HOPS {
            let found: Vec<&[u8]> = self
                .txt
                .iter()
                .filter(|(owner, _)| owner == at)
                .map(|(_, t)| t.as_slice())
                .collect();
            if !found.is_empty() {
                return found;
            }
            match self.cnames.iter().find(|(owner, _)| owner == at) {
                Some((_, target)) => at = target,
                None => break,
            }
        }
        Vec::new()
    }
}

/// Encodes a response for tests and tools: the question `name IN TXT`, and one TXT record per
/// entry of `txt` at that name (each split into strings of at most 255 bytes), the owner name
/// compressed to a pointer to the question.
pub fn txt_response(id: u16, name: &str, rcode: Rcode, txt: &[&[u8]]) -> Result<Vec<u8>, DnsError> {
    let mut msg = txt_query(id, name)?;
    let flags: u16 = 0x8180 | u16::from(rcode.0 & 0x0F);
    let count = u16::try_from(txt.len()).map_err(|_| DnsError::BadTxt)?;
    msg.splice(2..4, flags.to_be_bytes());
    msg.splice(6..8, count.to_be_bytes());
    for t in txt {
        let mut rdata = Vec::with_capacity(t.len().saturating_add(t.len() / 255).saturating_add(1));
        for chunk in t.chunks(255) {
            rdata.push(u8::try_from(chunk.len()).map_err(|_| DnsError::BadTxt)?);
            rdata.extend_from_slice(chunk);
        }
        if t.is_empty() {
            rdata.push(0);
        }
        let rdlength = u16::try_from(rdata.len()).map_err(|_| DnsError::BadTxt)?;
        msg.extend_from_slice(&[0xC0, 0x0C]);
        msg.extend_from_slice(&TYPE_TXT.to_be_bytes());
        msg.extend_from_slice(&CLASS_IN.to_be_bytes());
        msg.extend_from_slice(&60u32.to_be_bytes());
        msg.extend_from_slice(&rdlength.to_be_bytes());
        msg.extend_from_slice(&rdata);
    }
    Ok(msg)
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    /// dnsmasq 2.90's answer to `_kiln-challenge.example.test TXT` with
    /// `--txt-record=_kiln-challenge.example.test,"kiln-verify=abc"` (captured).
    const DNSMASQ: &[u8] = b"\x12\x34\x85\x80\x00\x01\x00\x01\x00\x00\x00\x00\x0f_kiln-challenge\x07example\x04test\x00\x00\x10\x00\x01\xc0\x0c\x00\x10\x00\x01\x00\x00\x00\x00\x00\x10\x0fkiln-verify=abc";

    #[test]
    fn hostnames() {
        for ok in [
            "example.com",
            "www.example.com",
            "a-b.c1.example",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(ok.parse::<Hostname>().unwrap().as_str(), ok);
        }
        let bad = [
            ("", HostnameError::Empty),
            ("localhost", HostnameError::SingleLabel),
            ("*.com", HostnameError::SingleLabel),
            ("a.*.example.com", HostnameError::Wildcard),
            ("**.example.com", HostnameError::Wildcard),
            ("*", HostnameError::SingleLabel),
            ("Example.com", HostnameError::BadChar { ch: 'E' }),
            ("a..b", HostnameError::LabelLength { len: 0 }),
            ("-a.example", HostnameError::Hyphen { label: "-a".into() }),
            ("10.0.0.1", HostnameError::IpLiteral),
            ("::1", HostnameError::SingleLabel),
            ("[::1].x", HostnameError::BadChar { ch: '[' }),
            ("a_b.example", HostnameError::BadChar { ch: '_' }),
        ];
        for (input, err) in bad {
            assert_eq!(input.parse::<Hostname>(), Err(err), "{input:?}");
        }
        assert!(format!("{}.example", "a".repeat(64))
            .parse::<Hostname>()
            .is_err());
        assert_eq!(
            format!("{}.example", "a.".repeat(124)).parse::<Hostname>(),
            Err(HostnameError::TooLong)
        );
        assert_eq!(
            Hostname::normalize(" WWW.Example.COM. ").unwrap().as_str(),
            "www.example.com"
        );
        let h: Hostname = "a.example.com".parse().unwrap();
        assert!(h.is_within("example.com") && h.is_within("a.example.com"));
        assert!(!h.is_within("ample.com") && !h.is_within("b.example.com"));
        assert_eq!(h.challenge_name(), "_kiln-challenge.a.example.com");
        let w: Hostname = "*.example.com".parse().unwrap();
        assert!(w.is_wildcard() && !h.is_wildcard());
        assert_eq!((w.as_str(), w.base()), ("*.example.com", "example.com"));
        assert_eq!(w.challenge_name(), "_kiln-challenge.example.com");
        assert!(w.is_within("example.com") && !w.is_within("a.example.com"));
        assert!("*.kiln.test"
            .parse::<Hostname>()
            .unwrap()
            .is_within("kiln.test"));
        assert_eq!(
            format!("*.{}.example", "a.".repeat(124)).parse::<Hostname>(),
            Err(HostnameError::TooLong)
        );
        // Serde validates too.
        assert!(serde_json::from_str::<Hostname>("\"10.1.2.3\"").is_err());
    }

    #[test]
    fn query_encodes_the_question() {
        let q = txt_query(0x1234, "_kiln-challenge.example.test").unwrap();
        // The same bytes as dnsmasq's answer up to the end of the question, but for the flags
        // (a query with RD) and the answer count.
        let mut expect = DNSMASQ[..q.len()].to_vec();
        expect[2] = 0x01;
        expect[3] = 0x00;
        expect[7] = 0;
        assert_eq!(q, expect);
        assert!(txt_query(1, &format!("{}.x", "a".repeat(64))).is_err());
        assert!(txt_query(1, "").is_err());
        assert!(txt_query(1, &"a.".repeat(128)).is_err());
    }

    #[test]
    fn parses_a_captured_dnsmasq_answer() {
        let r = parse_response(DNSMASQ).unwrap();
        assert_eq!(
            (r.id, r.rcode, r.truncated),
            (0x1234, Rcode::NOERROR, false)
        );
        let name = name_of("_kiln-challenge.EXAMPLE.test");
        assert_eq!(r.question.as_ref(), Some(&name));
        assert_eq!(r.txt_for(&name), [b"kiln-verify=abc".as_slice()]);
        assert!(r.txt_for(&name_of("other.test")).is_empty());
        assert_eq!(display_name(&name), "_kiln-challenge.example.test.");
    }

    #[test]
    fn response_round_trips_long_and_several_records() {
        let long = vec![b'x'; 600];
        let msg = txt_response(7, "a.example", Rcode::NOERROR, &[b"one", &long, b""]).unwrap();
        let r = parse_response(&msg).unwrap();
        let got = r.txt_for(&name_of("a.example"));
        assert_eq!(got, [b"one".as_slice(), long.as_slice(), b"".as_slice()]);
        let nx = txt_response(8, "a.example", Rcode::NXDOMAIN, &[]).unwrap();
        assert_eq!(parse_response(&nx).unwrap().rcode, Rcode::NXDOMAIN);
        assert_eq!(Rcode(3).to_string(), "NXDOMAIN");
        assert_eq!(Rcode(11).to_string(), "RCODE11");
    }

    #[test]
    fn follows_cnames() {
        // _kiln-challenge.a.example CNAME c.delegate.test; c.delegate.test TXT "t".
        let mut msg = txt_query(9, "_kiln-challenge.a.example").unwrap();
        msg[2] = 0x81;
        msg[3] = 0x80;
        msg[7] = 2;
        let target: &[u8] = b"\x01c\x08delegate\x04test\x00";
        msg.extend_from_slice(&[0xC0, 0x0C, 0, 5, 0, 1, 0, 0, 0, 60, 0, target.len() as u8]);
        let target_at = msg.len();
        msg.extend_from_slice(target);
        msg.extend_from_slice(&[
            0xC0,
            target_at as u8,
            0,
            16,
            0,
            1,
            0,
            0,
            0,
            60,
            0,
            2,
            1,
            b't',
        ]);
        let r = parse_response(&msg).unwrap();
        assert_eq!(
            r.txt_for(&name_of("_kiln-challenge.a.example")),
            [b"t".as_slice()]
        );
        // A CNAME loop ends.
        let looped = Response {
            id: 0,
            rcode: Rcode::NOERROR,
            truncated: false,
            question: None,
            txt: vec![],
            cnames: vec![
                (name_of("a.x"), name_of("b.x")),
                (name_of("b.x"), name_of("a.x")),
            ],
        };
        assert!(looped.txt_for(&name_of("a.x")).is_empty());
    }

    #[test]
    fn malformed_answers_are_errors() {
        // A query is not a response.
        let q = txt_query(1, "a.example").unwrap();
        assert_eq!(parse_response(&q), Err(DnsError::NotAResponse));
        // Every prefix of a valid answer is an error (or, cut inside nothing, a valid answer).
        for n in 0..DNSMASQ.len() {
            assert!(parse_response(&DNSMASQ[..n]).is_err(), "prefix {n}");
        }
        let mut m = DNSMASQ.to_vec();
        // A pointer to itself, and a pointer forward.
        let ptr = 0x0C + 30 + 4;
        m[ptr] = 0xC0;
        m[ptr + 1] = ptr as u8;
        assert!(matches!(
            parse_response(&m),
            Err(DnsError::BadPointer { .. })
        ));
        m[ptr + 1] = (ptr + 4) as u8;
        assert!(matches!(
            parse_response(&m),
            Err(DnsError::BadPointer { .. })
        ));
        // Two pointers pointing at each other: the second is refused.
        let mut lp = DNSMASQ[..12].to_vec();
        lp[5] = 1; // one question
        lp[7] = 0;
        lp.extend_from_slice(&[0xC0, 14, 0xC0, 12, 0, 16, 0, 1]);
        assert!(matches!(
            parse_response(&lp),
            Err(DnsError::BadPointer { .. })
        ));
        // Reserved label types.
        let mut m = DNSMASQ.to_vec();
        m[12] = 0x40;
        assert!(matches!(
            parse_response(&m),
            Err(DnsError::LabelType { bits: 0x40 })
        ));
        // A TXT string longer than its record.
        let mut m = DNSMASQ.to_vec();
        let last = m.len() - 16;
        m[last] = 200;
        assert_eq!(parse_response(&m), Err(DnsError::BadTxt));
        // A name longer than 255 bytes, built from labels of 63.
        let mut long = DNSMASQ[..12].to_vec();
        long[5] = 1;
        long[7] = 0;
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.extend_from_slice(&[0, 0, 16, 0, 1]);
        assert_eq!(parse_response(&long), Err(DnsError::NameTooLong));
        // Counts that lie: huge counts over a short message end with an error, fast.
        let mut m = DNSMASQ.to_vec();
        m[6] = 0xFF;
        m[7] = 0xFF;
        assert!(parse_response(&m).is_err());
    }

    #[test]
    fn truncated_answers_keep_what_was_whole() {
        let mut m = DNSMASQ.to_vec();
        m[2] |= 0x02;
        let cut = &m[..m.len() - 5];
        let r = parse_response(cut).unwrap();
        assert!(r.truncated);
        assert!(r.txt.is_empty());
    }

    #[test]
    fn seeded_mutations_never_panic() {
        // A small xorshift: deterministic, no dependency.
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let seeds = [
            DNSMASQ.to_vec(),
            txt_response(
                3,
                "_kiln-challenge.a.example",
                Rcode::NOERROR,
                &[b"kiln-verify=x", &[b'y'; 300]],
            )
            .unwrap(),
        ];
        for _ in 0..20_000 {
            let mut m = seeds[(next() % 2) as usize].clone();
            for _ in 0..(next() % 6) {
                let i = (next() as usize) % m.len();
                m[i] = next() as u8;
            }
            if next() % 4 == 0 {
                let n = (next() as usize) % (m.len() + 1);
                m.truncate(n);
            }
            if let Ok(r) = parse_response(&m) {
                let _ = r.txt_for(&name_of("_kiln-challenge.a.example"));
            }
        }
    }
}
