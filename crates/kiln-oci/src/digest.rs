//! Content digests. Kiln accepts exactly one form, `sha256:<64 lowercase hex>`: it is what every
//! registry produces, and a single canonical spelling means a digest can be compared as a string
//! and used as a file name without further escaping.

use sha2::{Digest as _, Sha256};

const PREFIX: &str = "sha256:";

/// Whether `digest` is `sha256:` followed by 64 lowercase hex digits.
pub fn is_valid_digest(digest: &str) -> bool {
    digest_hex(digest).is_some()
}

/// The hex part of a valid digest.
pub(crate) fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix(PREFIX)?;
    let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then_some(hex)
}

/// The digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("{PREFIX}{}", hex::encode(Sha256::digest(bytes)))
}

/// A running digest over a stream, with the number of bytes seen.
#[derive(Default)]
pub(crate) struct DigestHasher {
    hasher: Sha256,
    len: u64,
}

impl DigestHasher {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn finish(self) -> String {
        format!("{PREFIX}{}", hex::encode(self.hasher.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty_input() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut h = DigestHasher::default();
        h.update(b"");
        assert_eq!(h.finish(), sha256_digest(b""));
    }

    #[test]
    fn only_canonical_sha256_is_valid() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(is_valid_digest(&format!("sha256:{hex}")));
        assert!(!is_valid_digest(&format!("sha256:{}", hex.to_uppercase())));
        assert!(!is_valid_digest(&format!("sha512:{hex}")));
        assert!(!is_valid_digest(&format!("sha256:{}", &hex[1..])));
        assert!(!is_valid_digest("sha256:../../etc/passwd"));
        assert!(!is_valid_digest(hex));
    }
}
