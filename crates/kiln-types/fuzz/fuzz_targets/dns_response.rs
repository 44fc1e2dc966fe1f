//! Any bytes as a DNS resolver's answer (untrusted: the control plane reads it to verify a
//! custom domain): decoding never panics, ends in bounded time (compression pointers only go
//! backwards), and following CNAMEs from any name ends.
#![no_main]

use kiln_types::dns;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = dns::parse_response(data) {
        assert!(r.txt.len() + r.cnames.len() <= data.len() / 11 + 1);
        if let Some(q) = &r.question {
            let _ = r.txt_for(q);
        }
        let _ = r.txt_for(&dns::name_of("_kiln-challenge.example.com"));
    }
});
