//! Fuzzes `kiln_edge::sni::parse_client_hello`.
//!
//! Beyond "never panics", checks the incremental contract the edge relies on: the answer for a
//! prefix is `NeedMore` or exactly the answer for the whole input, so deciding early on a partial
//! buffer is never contradicted by later bytes.
#![no_main]

use kiln_edge::sni::{parse_client_hello, HelloError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = parse_client_hello(data);
    if let Ok(hello) = &full {
        assert!(hello.wire_len <= data.len());
        assert_eq!(parse_client_hello(&data[..hello.wire_len]), full);
    }
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        let part = parse_client_hello(&data[..cut]);
        assert!(
            part == Err(HelloError::NeedMore) || part == full,
            "prefix {cut}: {part:?}, whole: {full:?}"
        );
    }
});
