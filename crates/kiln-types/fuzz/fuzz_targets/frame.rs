//! Any bytes: decoding never panics, consumes within bounds, and what decodes re-encodes to the
//! same bytes (for frames whose encoding is canonical: all but JSON payloads); a secrets frame's
//! `Debug` never shows its file bytes, whatever they are.
#![no_main]

use kiln_types::frame::{Frame, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = Frame::decode(data) {
        assert!(used <= data.len());
        if !matches!(frame, Frame::ExecStart { .. } | Frame::Exit { .. } | Frame::Error { .. }) {
            assert_eq!(frame.to_bytes(), &data[..used]);
        }
        if let Frame::Secrets { file, .. } = &frame {
            let shown = format!("{frame:?}");
            assert!(shown.len() < 128, "{shown}");
            assert!(file.0.len() < 8 || !shown.contains(&*String::from_utf8_lossy(&file.0)));
        }
    }
    // The same bytes fed one at a time give the same frames as fed at once.
    let mut whole = FrameReader::new();
    whole.push(data);
    let mut split = FrameReader::new();
    let mut from_split = Vec::new();
    for b in data {
        split.push(std::slice::from_ref(b));
        while let Ok(Some(f)) = split.next_frame() {
            from_split.push(f);
        }
    }
    let mut from_whole = Vec::new();
    while let Ok(Some(f)) = whole.next_frame() {
        from_whole.push(f);
    }
    assert_eq!(from_whole, from_split);
});
