//! Any bytes as a VM's config disk (the exit record is written by the guest, so untrusted by the
//! host): decoding never panics, and a decoded run configuration re-encodes to a disk that
//! decodes to the same configuration.
#![no_main]

use kiln_types::guest::config_disk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = config_disk::decode_exit(data);
    if let Ok(config) = config_disk::decode(data) {
        let disk = config_disk::encode(&config);
        assert_eq!(config_disk::decode(&disk).as_ref(), Ok(&config));
    }
});
