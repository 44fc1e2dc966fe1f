//! The edge's two parsers of untrusted bytes, on real and synthetic inputs.
//!
//! - ClientHello: hellos captured from `openssl s_client` and `curl` on a local socket
//!   (`tests/fixtures/`), plus a synthetic post-quantum hello built below, read at every prefix length
//!   and re-framed across records at every boundary; malformed variants; a seeded mutation run.
//! - PROXY v2: byte vectors written by hand from the spec, and an encode/decode round trip over
//!   random headers.
//!
//! The mutation tests are a deterministic stand-in for the cargo-fuzz targets in `fuzz/`, cheap
//! enough for the default test run.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use kiln_edge::proxy_v2::{self, Decoded, ProxyError, ProxyHeader};
use kiln_edge::sni::{parse_client_hello, ClientHello, HelloError, MAX_HELLO_BYTES};

/// `openssl s_client -connect 127.0.0.1:PORT -servername example.kiln.test` (OpenSSL 3.0).
const OPENSSL: &[u8] = include_bytes!("fixtures/openssl-s_client.bin");
/// `curl -k --resolve app.kiln.test:PORT:127.0.0.1 https://app.kiln.test:PORT/` (curl 7.88, OpenSSL 3.0).
const CURL: &[u8] = include_bytes!("fixtures/curl.bin");
/// Headless Chromium 156 (Debian 12) opening `https://pq.kiln.test:PORT/`: 1,920 bytes with an
/// X25519MLKEM768 key share (group 0x11ec), GREASE and ECH GREASE.
const CHROMIUM_PQ: &[u8] = include_bytes!("fixtures/chromium-pq.bin");

// ---------------------------------------------------------------------------------------------
// Helpers: TLS framing and a ClientHello builder.

fn vec8(data: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::try_from(data.len()).unwrap()];
    out.extend_from_slice(data);
    out
}

fn vec16(data: &[u8]) -> Vec<u8> {
    let mut out = u16::try_from(data.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

fn u16s(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// The GREASE value number `i` (RFC 8701): 0x0A0A, 0x1A1A, ...
fn grease(i: u16) -> u16 {
    0x0a0a + 0x1010 * (i % 16)
}

/// A ClientHello, built field by field so that tests can break any one of them.
#[derive(Clone)]
struct Hello {
    session_id: Vec<u8>,
    suites: Vec<u16>,
    extensions: Vec<(u16, Vec<u8>)>,
}

impl Hello {
    /// The handshake message, header included.
    fn message(&self) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend((0u8..32).map(|i| i.wrapping_mul(37)));
        body.extend(vec8(&self.session_id));
        body.extend(vec16(&u16s(&self.suites)));
        body.extend(vec8(&[0]));
        let exts: Vec<u8> = self
            .extensions
            .iter()
            .flat_map(|(ty, data)| [ty.to_be_bytes().to_vec(), vec16(data)].concat())
            .collect();
        body.extend(vec16(&exts));
        handshake_message(1, &body)
    }
}

fn handshake_message(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap().to_be_bytes();
    let mut msg = vec![msg_type, len[1], len[2], len[3]];
    msg.extend_from_slice(body);
    msg
}

fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
    (0, vec16(&[vec![0], vec16(name)].concat()))
}

fn alpn_ext(protocols: &[&[u8]]) -> (u16, Vec<u8>) {
    let list: Vec<u8> = protocols.iter().flat_map(|p| vec8(p)).collect();
    (16, vec16(&list))
}

/// A hello shaped like Chrome's with X25519MLKEM768: GREASE everywhere, a 1216-byte ML-KEM + X25519
/// key share (group 0x11EC), an ECH GREASE extension. About 1.9 KB: more than one TCP segment.
fn pq_hello() -> Hello {
    let mut rng = Rng::new(0x9e3779b97f4a7c15);
    let key_shares = [
        u16s(&[grease(2)]),
        vec16(&[0]),
        u16s(&[0x11ec]),
        vec16(&rng.bytes(1216)),
        u16s(&[0x001d]),
        vec16(&rng.bytes(32)),
    ]
    .concat();
    let ech = [
        vec![0, 0, 1, 0, 1, 0x42],
        vec16(&rng.bytes(32)),
        vec16(&rng.bytes(176)),
    ]
    .concat();
    Hello {
        session_id: rng.bytes(32),
        suites: vec![
            grease(0),
            0x1301,
            0x1302,
            0x1303,
            0xc02b,
            0xc02f,
            0xc02c,
            0xc030,
            0xcca9,
            0xcca8,
            0xc013,
            0xc014,
            0x009c,
            0x009d,
            0x002f,
            0x0035,
        ],
        extensions: vec![
            (grease(1), vec![]),
            sni_ext(b"PQ.Kiln.Test"),
            (0x0017, vec![]),
            (0xff01, vec![0]),
            (
                0x000a,
                vec16(&u16s(&[grease(2), 0x11ec, 0x001d, 0x0017, 0x0018])),
            ),
            (0x000b, vec8(&[0])),
            (0x0023, vec![]),
            alpn_ext(&[b"h2", b"http/1.1"]),
            (0x0005, vec![1, 0, 0, 0, 0]),
            (
                0x000d,
                vec16(&u16s(&[
                    0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
                ])),
            ),
            (0x0012, vec![]),
            (0x0033, vec16(&key_shares)),
            (0x002d, vec8(&[1])),
            (0x002b, vec8(&u16s(&[grease(3), 0x0304, 0x0303]))),
            (0x001b, vec8(&u16s(&[2]))),
            (0x44cd, vec16(&vec8(b"h2"))),
            (0xfe0d, ech),
            (grease(4), vec![0]),
        ],
    }
}

/// Frames a handshake stream as records of the given fragment sizes (the last one takes the rest).
fn frame(handshake: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = handshake;
    let mut sizes = sizes.iter();
    while !rest.is_empty() {
        let n = sizes.next().map_or(rest.len(), |&n| n.min(rest.len()));
        out.extend([22, 3, 1]);
        out.extend(vec16(&rest[..n]));
        rest = &rest[n..];
    }
    out
}

fn one_record(handshake: &[u8]) -> Vec<u8> {
    frame(handshake, &[])
}

/// The handshake stream carried by well-formed records.
fn handshake_of(mut wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        assert_eq!(wire[0], 22);
        let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
        out.extend_from_slice(&wire[5..5 + len]);
        wire = &wire[5 + len..];
    }
    out
}

/// Asserts the incremental contract on `wire`: every shorter prefix is `NeedMore` or the same final
/// answer, and appending bytes after a final answer does not change it.
fn assert_incremental(wire: &[u8], expected: &Result<ClientHello, HelloError>) {
    let got = parse_client_hello(wire);
    assert_eq!(&got, expected);
    for cut in 0..wire.len() {
        let part = parse_client_hello(&wire[..cut]);
        assert!(
            part == Err(HelloError::NeedMore) || &part == expected,
            "prefix {cut}/{}: {part:?}, full: {expected:?}",
            wire.len()
        );
    }
    if expected != &Err(HelloError::NeedMore) {
        let mut longer = wire.to_vec();
        longer.extend([23, 3, 3, 0, 1, 0xff]);
        assert_eq!(&parse_client_hello(&longer), expected);
    }
}

/// Asserts that a complete hello is reported only at its last byte, with the expected SNI.
fn assert_needs_every_byte(wire: &[u8], sni: &str) -> ClientHello {
    for cut in 0..wire.len() {
        assert_eq!(
            parse_client_hello(&wire[..cut]),
            Err(HelloError::NeedMore),
            "prefix {cut}/{}",
            wire.len()
        );
    }
    let hello = parse_client_hello(wire).unwrap();
    assert_eq!(hello.sni.as_deref(), Some(sni));
    assert_eq!(hello.wire_len, wire.len());
    hello
}

// ---------------------------------------------------------------------------------------------
// ClientHello: well-formed inputs.

#[test]
fn openssl_capture() {
    let hello = assert_needs_every_byte(OPENSSL, "example.kiln.test");
    assert!(hello.alpn.is_empty());
    assert_eq!(hello.legacy_version, 0x0303);
    assert_eq!(hello.supported_versions, [0x0304, 0x0303, 0x0302, 0x0301]);
}

#[test]
fn curl_capture() {
    let hello = assert_needs_every_byte(CURL, "app.kiln.test");
    assert_eq!(hello.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(hello.supported_versions, [0x0304, 0x0303, 0x0302, 0x0301]);
}

#[test]
fn chromium_post_quantum_capture() {
    assert!(CHROMIUM_PQ.len() > 1500, "only {} bytes", CHROMIUM_PQ.len());
    // The hybrid post-quantum group is offered and its key share is in the hello.
    assert!(CHROMIUM_PQ.windows(2).any(|w| w == [0x11, 0xec]));
    let hello = assert_needs_every_byte(CHROMIUM_PQ, "pq.kiln.test");
    assert_eq!(hello.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert!(hello.supported_versions.contains(&0x0304));
    // Re-framed into records cut at every byte boundary, and as it would arrive in 1,460-byte TCP
    // segments: each segment parsed as it arrives.
    let msg = handshake_of(CHROMIUM_PQ);
    for cut in 1..msg.len() {
        let wire = frame(&msg, &[cut]);
        let h = parse_client_hello(&wire).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_eq!(h.sni.as_deref(), Some("pq.kiln.test"));
    }
    let mut got = Vec::new();
    for segment in CHROMIUM_PQ.chunks(1460) {
        assert_eq!(parse_client_hello(&got), Err(HelloError::NeedMore));
        got.extend_from_slice(segment);
    }
    assert_eq!(parse_client_hello(&got).unwrap(), hello);
}

#[test]
fn post_quantum_hello_with_grease() {
    let wire = one_record(&pq_hello().message());
    assert!(wire.len() > 1500, "only {} bytes", wire.len());
    let hello = assert_needs_every_byte(&wire, "pq.kiln.test");
    assert_eq!(hello.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(hello.supported_versions, [0x0304, 0x0303]);
}

#[test]
fn hello_spread_over_several_records() {
    let msg = pq_hello().message();
    let wire = frame(&msg, &[700, 3, 900]);
    assert_eq!(wire.len(), msg.len() + 4 * 5);
    assert_needs_every_byte(&wire, "pq.kiln.test");
}

#[test]
fn one_byte_records() {
    // The most fragmented legal framing: even the handshake header is split.
    let wire = frame(&handshake_of(CURL), &[1; 600]);
    assert_needs_every_byte(&wire, "app.kiln.test");
}

#[test]
fn every_two_record_split() {
    for (name, sni, msg) in [
        ("openssl", "example.kiln.test", handshake_of(OPENSSL)),
        ("curl", "app.kiln.test", handshake_of(CURL)),
        ("chromium", "pq.kiln.test", handshake_of(CHROMIUM_PQ)),
        ("pq", "pq.kiln.test", pq_hello().message()),
    ] {
        for cut in 1..msg.len() {
            let wire = frame(&msg, &[cut]);
            let hello =
                parse_client_hello(&wire).unwrap_or_else(|e| panic!("{name} cut {cut}: {e}"));
            assert_eq!(hello.sni.as_deref(), Some(sni));
            assert_eq!(hello.wire_len, wire.len());
        }
        // And every prefix, for splits in the header, in the middle and at the end.
        for cut in [1, 2, 3, 4, 5, msg.len() / 2, msg.len() - 1] {
            assert_needs_every_byte(&frame(&msg, &[cut]), sni);
        }
    }
}

#[test]
fn bytes_after_the_hello_are_not_waited_for() {
    // The rest of the record after the hello (a second handshake message), and later records, are
    // not needed: the answer comes as soon as the hello's last byte has arrived.
    let msg = handshake_of(CURL);
    let mut stream = msg.clone();
    stream.extend(handshake_message(11, &[0; 40]));
    let wire = one_record(&stream);
    let hello = parse_client_hello(&wire[..5 + msg.len()]).unwrap();
    assert_eq!(hello.wire_len, 5 + msg.len());
    assert_eq!(parse_client_hello(&wire), Ok(hello));

    let mut wire = CURL.to_vec();
    wire.extend([23, 3, 3, 0x40, 0]);
    assert_eq!(parse_client_hello(&wire).unwrap().wire_len, CURL.len());
}

#[test]
fn largest_hellos() {
    // A 16 KB hello (padding) needs two records; it is legal and parses.
    let mut big = pq_hello();
    big.extensions.push((0x0015, vec![0; 20_000]));
    let msg = big.message();
    let wire = frame(&msg, &[1 << 14]);
    assert_eq!(parse_client_hello(&wire).unwrap().wire_len, wire.len());
    // The same hello in 1-byte records needs 6 bytes of connection per byte of hello: over budget,
    // which is known as soon as the record that crosses MAX_HELLO_BYTES is seen.
    let wire = frame(&msg, &[1; 30_000]);
    assert_eq!(parse_client_hello(&wire), Err(HelloError::TooLarge));
    assert_eq!(
        parse_client_hello(&wire[..MAX_HELLO_BYTES]),
        Err(HelloError::TooLarge)
    );
    assert_eq!(
        parse_client_hello(&wire[..40_000]),
        Err(HelloError::NeedMore)
    );
}

// ---------------------------------------------------------------------------------------------
// ClientHello: malformed inputs. Each also checks that no prefix answers differently.

fn malformed(reason: &'static str) -> Result<ClientHello, HelloError> {
    Err(HelloError::Malformed { reason })
}

/// The PQ hello's message with the 16-bit big-endian field at `offset` changed by `delta`.
fn adjust_u16(mut msg: Vec<u8>, offset: usize, delta: i32) -> Vec<u8> {
    let v = i32::from(u16::from_be_bytes([msg[offset], msg[offset + 1]])) + delta;
    msg[offset..offset + 2].copy_from_slice(&u16::try_from(v).unwrap().to_be_bytes());
    msg
}

/// Rewrites the handshake header's length to match the message.
fn set_body_len(mut msg: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(msg.len() - 4).unwrap().to_be_bytes();
    msg[1..4].copy_from_slice(&len[1..]);
    msg
}

/// Offset of the extensions length in a message from `Hello::message`.
fn extensions_offset(hello: &Hello) -> usize {
    4 + 2 + 32 + 1 + hello.session_id.len() + 2 + 2 * hello.suites.len() + 2
}

#[test]
fn length_fields_that_disagree_with_their_container() {
    let hello = pq_hello();
    let msg = hello.message();
    let exts = extensions_offset(&hello);
    let first_ext = exts + 2; // GREASE extension: type(2) len(2) = 0
    let sni = first_ext + 4; // server_name: type(2) len(2) list_len(2) type(1) name_len(2)
    let cases: Vec<(Vec<u8>, Result<ClientHello, HelloError>)> = vec![
        // Handshake length one more / one less than the body.
        (
            {
                let mut m = msg.clone();
                m.push(0);
                set_body_len(m)
            },
            malformed("bytes after the extensions block"),
        ),
        (
            {
                let mut m = msg.clone();
                m.pop();
                set_body_len(m)
            },
            malformed("extensions overrun the ClientHello"),
        ),
        (
            adjust_u16(msg.clone(), exts, 1),
            malformed("extensions overrun the ClientHello"),
        ),
        (
            adjust_u16(msg.clone(), exts, -1),
            malformed("bytes after the extensions block"),
        ),
        (
            adjust_u16(msg.clone(), first_ext + 2, 0x7000),
            malformed("extension overruns the extensions block"),
        ),
        (
            adjust_u16(msg.clone(), sni + 2, 1),
            malformed("bytes after server_name_list"),
        ),
        (
            adjust_u16(msg.clone(), sni + 4, 1),
            malformed("server_name_list overruns the extension"),
        ),
        (
            adjust_u16(msg.clone(), sni + 4, -1),
            malformed("bytes after server_name_list"),
        ),
        (
            adjust_u16(msg.clone(), sni + 7, 1),
            malformed("server name overruns server_name_list"),
        ),
        // One byte left in the list: read as a name type, then no room for a length.
        (
            adjust_u16(msg.clone(), sni + 7, -1),
            malformed("server name overruns server_name_list"),
        ),
        // Cipher suites: odd length (also shifts everything after it).
        (
            adjust_u16(msg.clone(), 4 + 2 + 32 + 1 + 32, -1),
            malformed("cipher_suites length is not a positive even number"),
        ),
    ];
    for (i, (msg, expected)) in cases.into_iter().enumerate() {
        let wire = one_record(&msg);
        assert_eq!(parse_client_hello(&wire), expected, "case {i}");
        assert_incremental(&wire, &expected);
    }
}

#[test]
fn bad_values_in_known_extensions() {
    let with_exts = |exts: Vec<(u16, Vec<u8>)>| {
        one_record(
            &Hello {
                extensions: exts,
                ..pq_hello()
            }
            .message(),
        )
    };
    let cases = [
        (
            vec![sni_ext(b"bad name.test")],
            malformed("invalid character in host_name"),
        ),
        (
            vec![sni_ext(b"caf\xc3\xa9.test")],
            malformed("invalid character in host_name"),
        ),
        (vec![sni_ext(b"")], malformed("empty host_name")),
        (
            vec![sni_ext(b"a.test.")],
            malformed("empty label in host_name"),
        ),
        (
            vec![sni_ext(&[b'a'; 254])],
            malformed("host_name longer than 253 bytes"),
        ),
        (vec![(0, vec16(&[]))], malformed("empty server_name_list")),
        (
            vec![(0, vec![])],
            malformed("server_name_list overruns the extension"),
        ),
        (
            vec![alpn_ext(&[b"h2", b""])],
            malformed("empty ALPN protocol name"),
        ),
        (vec![alpn_ext(&[])], malformed("empty ALPN list")),
        (
            vec![(43, vec8(&[3]))],
            malformed("supported_versions length is not a positive even number"),
        ),
        (
            vec![alpn_ext(&[b"h2"]), alpn_ext(&[b"h2"])],
            malformed("duplicate ALPN extension"),
        ),
    ];
    for (i, (exts, expected)) in cases.into_iter().enumerate() {
        let wire = with_exts(exts);
        assert_eq!(parse_client_hello(&wire), expected, "case {i}");
        assert_incremental(&wire, &expected);
    }
    // An SNI list with a host_name and an unknown name type: the unknown one is skipped.
    let list = [vec![7], vec16(b"whatever"), vec![0], vec16(b"ok.test")].concat();
    let wire = with_exts(vec![(0, vec16(&list))]);
    assert_eq!(
        parse_client_hello(&wire).unwrap().sni.as_deref(),
        Some("ok.test")
    );
}

#[test]
fn wrong_record_or_message_types() {
    let msg = handshake_of(CURL);
    // Application data / alert as the first record: not TLS as far as routing is concerned.
    let mut wire = CURL.to_vec();
    wire[0] = 23;
    assert_eq!(parse_client_hello(&wire), Err(HelloError::NotTls));
    wire[0] = 21;
    assert_eq!(parse_client_hello(&wire), Err(HelloError::NotTls));
    // Record version 2.x.
    let mut wire = CURL.to_vec();
    wire[1] = 2;
    assert_eq!(parse_client_hello(&wire), Err(HelloError::NotTls));
    // A non-handshake record in the middle of the hello.
    let mut wire = frame(&msg, &[100]);
    wire[5 + 100] = 23;
    let expected = malformed("non-handshake record before the end of the ClientHello");
    assert_incremental(&wire, &expected);
    // A ServerHello (type 2) instead of a ClientHello.
    let mut m = msg.clone();
    m[0] = 2;
    assert_incremental(
        &one_record(&m),
        &Err(HelloError::NotClientHello { msg_type: 2 }),
    );
    // A record longer than 2^14.
    let mut wire = CURL.to_vec();
    wire[3..5].copy_from_slice(&0x4001u16.to_be_bytes());
    assert_incremental(&wire, &malformed("record longer than 2^14 bytes"));
}

#[test]
fn huge_declared_length_is_too_large_at_once() {
    let mut m = handshake_of(CURL);
    m[1..4].copy_from_slice(&[0x01, 0x00, 0x00]);
    // Known from the handshake header, 9 bytes into the connection.
    assert_eq!(
        parse_client_hello(&one_record(&m)[..9]),
        Err(HelloError::TooLarge)
    );
    assert_incremental(&one_record(&m), &Err(HelloError::TooLarge));
}

// ---------------------------------------------------------------------------------------------
// Mutation runs ("fuzz-lite").

/// xorshift64*: tiny, seedable, good enough to spread mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
    }

    fn byte(&mut self) -> u8 {
        self.next().to_be_bytes()[0]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// One to four random edits, biased toward what breaks parsers: length fields.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 if at < out.len() => out[at] = [0, 1, 0x7f, 0x80, 0xff, rng.byte()][rng.below(6)],
            2 => out.truncate(at),
            3 => {
                let n = 1 + rng.below(8);
                let extra = rng.bytes(n);
                out.splice(at..at, extra);
            }
            4 => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            5 if at + 2 <= out.len() => {
                let old = u16::from_be_bytes([out[at], out[at + 1]]);
                let new = [
                    0,
                    1,
                    0xffff,
                    0x4000,
                    0x4001,
                    old.wrapping_add(1),
                    old.wrapping_sub(1),
                ][rng.below(7)];
                out[at..at + 2].copy_from_slice(&new.to_be_bytes());
            }
            6 if at < out.len() => {
                // Duplicate a slice: repeated extensions, TLVs, records.
                let end = (at + 1 + rng.below(64)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(end..end, copy);
            }
            _ => {}
        }
    }
    out
}

fn seeds() -> Vec<Vec<u8>> {
    let pq = pq_hello().message();
    let mut proxied = Vec::new();
    ProxyHeader {
        source: "[2001:db8::1]:51000".parse().unwrap(),
        destination: "192.0.2.7:443".parse().unwrap(),
        authority: Some("app.kiln.test".into()),
        unique_id: Some(vec![7; 16]),
    }
    .encode(&mut proxied);
    let mut proxied_hello = proxied.clone();
    proxied_hello.extend_from_slice(CURL);
    vec![
        OPENSSL.to_vec(),
        CURL.to_vec(),
        CHROMIUM_PQ.to_vec(),
        one_record(&pq),
        frame(&pq, &[3, 500, 1]),
        frame(&handshake_of(OPENSSL), &[7; 64]),
        proxied,
        proxied_hello,
    ]
}

#[test]
fn fuzz_lite_never_panics() {
    // Fails only by panicking: any answer is acceptable, a crash is not.
    let seeds = seeds();
    let mut rng = Rng::new(0x1dc0_ffee);
    for _ in 0..20_000 {
        let seed = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed);
        let _ = parse_client_hello(&input);
        let _ = proxy_v2::decode(&input);
    }
}

#[test]
fn mutated_inputs_keep_the_incremental_contract() {
    // On broken input too, a prefix answers NeedMore or the final answer: the edge may decide on
    // whatever bytes it has without ever being contradicted by later ones.
    let seeds = seeds();
    let mut rng = Rng::new(42);
    for _ in 0..2_000 {
        let seed = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed);
        let full = parse_client_hello(&input);
        let proxy_full = proxy_v2::decode(&input);
        for _ in 0..8 {
            let cut = rng.below(input.len() + 1);
            let part = parse_client_hello(&input[..cut]);
            assert!(
                part == Err(HelloError::NeedMore) || part == full,
                "{input:02x?} at {cut}: {part:?} vs {full:?}"
            );
            let part = proxy_v2::decode(&input[..cut]);
            assert!(
                part == Err(ProxyError::NeedMore) || part == proxy_full,
                "{input:02x?} at {cut}: {part:?} vs {proxy_full:?}"
            );
        }
        // A decoded PROXY header re-encodes to something that decodes to the same header.
        if let Ok(Decoded::Proxy { header, consumed }) = proxy_full {
            assert!(consumed <= input.len());
            let mut again = Vec::new();
            header.encode(&mut again);
            assert_eq!(
                proxy_v2::decode(&again),
                Ok(Decoded::Proxy {
                    header,
                    consumed: again.len()
                })
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PROXY v2.

/// Spec section 2.2, TCP over IPv4, no TLVs: 192.0.2.1:56324 -> 198.51.100.7:443.
const PROXY_TCP4: &[u8] = &[
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, // signature
    0x21, // version 2, command PROXY
    0x11, // AF_INET, STREAM
    0x00, 0x0c, // 12 bytes follow
    0xc0, 0x00, 0x02, 0x01, // 192.0.2.1
    0xc6, 0x33, 0x64, 0x07, // 198.51.100.7
    0xdc, 0x04, // 56324
    0x01, 0xbb, // 443
];

/// TCP over IPv6 with both TLVs: [2001:db8::1]:51000 -> [2001:db8::2]:443, authority
/// "app.kiln.test", unique id de ad be ef.
const PROXY_TCP6: &[u8] = &[
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, // signature
    0x21, // version 2, command PROXY
    0x21, // AF_INET6, STREAM
    0x00, 0x3b, // 36 + (3 + 13) + (3 + 4) = 59 bytes follow
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // 2001:db8::1
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, // 2001:db8::2
    0xc7, 0x38, // 51000
    0x01, 0xbb, // 443
    0x02, 0x00, 0x0d, b'a', b'p', b'p', b'.', b'k', b'i', b'l', b'n', b'.', b't', b'e', b's',
    b't', // PP2_TYPE_AUTHORITY
    0x05, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef, // PP2_TYPE_UNIQUE_ID
];

#[test]
fn proxy_v2_spec_vectors() {
    let tcp4 = ProxyHeader {
        source: "192.0.2.1:56324".parse().unwrap(),
        destination: "198.51.100.7:443".parse().unwrap(),
        authority: None,
        unique_id: None,
    };
    let tcp6 = ProxyHeader {
        source: "[2001:db8::1]:51000".parse().unwrap(),
        destination: "[2001:db8::2]:443".parse().unwrap(),
        authority: Some("app.kiln.test".into()),
        unique_id: Some(vec![0xde, 0xad, 0xbe, 0xef]),
    };
    for (header, bytes) in [(tcp4, PROXY_TCP4), (tcp6, PROXY_TCP6)] {
        let mut out = b"existing".to_vec();
        header.encode(&mut out);
        assert_eq!(&out[8..], bytes);
        assert_eq!(header.encoded_len(), bytes.len());
        let decoded = proxy_v2::decode(bytes).unwrap();
        assert_eq!(
            decoded,
            Decoded::Proxy {
                header,
                consumed: bytes.len()
            }
        );
    }
}

fn random_addr(rng: &mut Rng) -> SocketAddr {
    let port = u16::try_from(rng.below(65536)).unwrap();
    let ip: IpAddr = if rng.below(2) == 0 {
        <[u8; 4]>::try_from(rng.bytes(4)).unwrap().into()
    } else {
        <[u8; 16]>::try_from(rng.bytes(16)).unwrap().into()
    };
    SocketAddr::new(ip, port)
}

fn random_authority(rng: &mut Rng) -> String {
    let target = 1 + rng.below(proxy_v2::MAX_AUTHORITY_LEN);
    let alphabet = ['a', 'z', '0', '-', '.', 'É', 'ß', '語', '🦀'];
    let mut out = String::new();
    loop {
        let c = alphabet[rng.below(alphabet.len())];
        if out.len() + c.len_utf8() > target {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        out.push('a');
    }
    out
}

#[test]
fn proxy_v2_round_trip() {
    let mut rng = Rng::new(0xfeed);
    for _ in 0..5_000 {
        let header = ProxyHeader {
            source: random_addr(&mut rng),
            destination: random_addr(&mut rng),
            authority: (rng.below(2) == 0).then(|| random_authority(&mut rng)),
            unique_id: (rng.below(2) == 0).then(|| {
                let n = rng.below(proxy_v2::MAX_UNIQUE_ID_LEN + 1);
                rng.bytes(n)
            }),
        };
        assert_eq!(header.check(), Ok(()));
        // Mixed families travel as TCP6 with the IPv4 side mapped.
        let mut expected = header.clone();
        if header.source.is_ipv4() != header.destination.is_ipv4() {
            for addr in [&mut expected.source, &mut expected.destination] {
                if let SocketAddr::V4(v4) = *addr {
                    *addr = SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into();
                }
            }
        }
        let mut wire = Vec::new();
        header.encode(&mut wire);
        assert_eq!(wire.len(), header.encoded_len());
        let len = wire.len();
        wire.extend_from_slice(&OPENSSL[..rng.below(OPENSSL.len())]);
        assert_eq!(
            proxy_v2::decode(&wire),
            Ok(Decoded::Proxy {
                header: expected,
                consumed: len
            })
        );
        let cut = rng.below(len);
        assert_eq!(proxy_v2::decode(&wire[..cut]), Err(ProxyError::NeedMore));
    }
}
