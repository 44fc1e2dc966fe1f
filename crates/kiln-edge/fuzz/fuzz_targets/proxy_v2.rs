//! Fuzzes `kiln_edge::proxy_v2::decode`.
//!
//! Beyond "never panics": a prefix answers `NeedMore` or the final answer, `consumed` stays inside
//! the input, and a decoded header re-encodes to bytes that decode to the same header.
#![no_main]

use kiln_edge::proxy_v2::{decode, Decoded, ProxyError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = decode(data);
    let part = decode(&data[..data.len() / 2]);
    assert!(part == Err(ProxyError::NeedMore) || part == full);
    match full {
        Ok(Decoded::Proxy { header, consumed }) => {
            assert!(consumed <= data.len());
            let mut again = Vec::new();
            header.encode(&mut again);
            assert_eq!(again.len(), header.encoded_len());
            assert_eq!(
                decode(&again),
                Ok(Decoded::Proxy {
                    header,
                    consumed: again.len()
                })
            );
        }
        Ok(Decoded::Local { consumed }) => assert!(consumed <= data.len()),
        Err(_) => {}
    }
});
