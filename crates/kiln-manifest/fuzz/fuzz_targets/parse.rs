//! Any bytes: the parser answers with a manifest or with problems, never a panic; and whatever it
//! accepts prints back (resolved and minimal) and stores as JSON without changing.
#![no_main]

use kiln_manifest::{parse, to_toml, Manifest, Style};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match parse("fuzz.toml", src) {
        Ok(m) => {
            for style in [Style::Resolved, Style::Minimal] {
                let printed = to_toml(&m, style);
                let back = parse("printed.toml", &printed).expect("printed manifest parses");
                assert_eq!(back, m, "{printed}");
            }
            let json = serde_json::to_string(&m).expect("serialize");
            let back: Manifest = serde_json::from_str(&json).expect("stored JSON reads back");
            assert_eq!(back, m);
        }
        Err(e) => assert!(!e.problems.is_empty()),
    }
});
