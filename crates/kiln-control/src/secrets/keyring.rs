//! Envelope encryption of secrets (docs/specs/secrets/encryption-at-rest.md).
//!
//! 1. A **master key** (32 random bytes) lives outside the database: a file (`--master-key-file`)
//!    or the `KILN_MASTER_KEY` environment variable. Its id, `mk_…`, is derived from the key
//!    itself, so a wrong key is named by what it is, and nothing has to store the id.
//! 2. Each org has a **data key** (32 random bytes, id `dk_…`), stored only wrapped: encrypted
//!    with the current master key, XChaCha20-Poly1305, associated data binding it to its org and
//!    id (`DataKeyCreated` carries the master key id and the wrapped bytes).
//! 3. Each secret value is encrypted with its org's data key, associated data binding it to
//!    (org, app, env, name, version): a ciphertext copied onto another name, app or version fails
//!    to decrypt rather than delivering the wrong value.
//! 4. Rotation adds a new master key as the current one and rewraps every data key with it
//!    (`DataKeyRewrapped`); secret ciphertexts never change. A key file may hold several keys
//!    (the first is current), so the old key stays usable until every data key is rewrapped.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

use kiln_types::OrgId;

/// The environment variable holding master keys when no file is given.
pub const MASTER_KEY_ENV: &str = "KILN_MASTER_KEY";
/// Prefix of one master key in a key file or the environment variable.
const KEY_PREFIX: &str = "kiln-mk1:";
const NONCE_LEN: usize = 24;

/// Where master keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A file of keys, one per line, the current one first (re-read when a stored key names a
    /// master key id it does not hold, which is how running control planes pick up a rotation).
    File(PathBuf),
    /// The keys themselves, as read from [`MASTER_KEY_ENV`] (comma or newline separated).
    Env(String),
}

impl MasterKeySource {
    fn origin(&self) -> String {
        match self {
            MasterKeySource::File(p) => p.display().to_string(),
            MasterKeySource::Env(_) => format!("${MASTER_KEY_ENV}"),
        }
    }
}

/// A key-management operation failed. Messages name key ids, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("cannot read the master key file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the master key file {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("entry {entry} of {origin} is not a master key (expected `{KEY_PREFIX}` and the base64 of 32 bytes)")]
    Malformed { origin: String, entry: usize },
    #[error("{origin} holds no master key")]
    Empty { origin: String },
    #[error("no master key is configured (pass --master-key-file or set ${MASTER_KEY_ENV})")]
    NotConfigured,
    #[error("data key {data_key} is wrapped by master key {master_key_id}, which {origin} does not hold; configure that key (or the key file that a rotation wrote)")]
    MissingMasterKey {
        master_key_id: String,
        data_key: String,
        origin: String,
    },
    #[error("data key {data_key} does not decrypt with master key {master_key_id}: the stored wrapped key was altered or the key in {origin} under that id is not the one that wrapped it")]
    Unwrap {
        master_key_id: String,
        data_key: String,
        origin: String,
    },
    #[error(
        "secret {name} (data key {data_key}) does not decrypt: its ciphertext was altered or moved"
    )]
    Open { name: String, data_key: String },
    #[error("the stored data key {data_key} or a ciphertext under it is not valid base64 of the expected length")]
    Encoding { data_key: String },
}

/// 32 bytes of key material; never printed.
#[derive(Clone)]
struct KeyBytes([u8; 32]);

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyBytes(..)")
    }
}

impl KeyBytes {
    fn random() -> KeyBytes {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("operating system random source");
        KeyBytes(k)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    /// nonce ‖ ciphertext ‖ tag, base64.
    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("operating system random source");
        let ct = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // Encryption fails only for inputs beyond 256 GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        B64.encode(out)
    }

    /// `None` when the blob is malformed or does not authenticate.
    fn open(&self, aad: &[u8], blob: &str) -> Option<Vec<u8>> {
        let raw = B64.decode(blob).ok()?;
        if raw.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
    }
}

/// A master key and its id.
#[derive(Debug, Clone)]
pub struct MasterKey {
    id: String,
    key: KeyBytes,
}

impl MasterKey {
    pub fn generate() -> MasterKey {
        Self::from_bytes(KeyBytes::random())
    }

    fn from_bytes(key: KeyBytes) -> MasterKey {
        let mut h = Sha256::new();
        h.update(b"kiln master key id\0");
        h.update(key.0);
        let id = format!("mk_{}", &hex::encode(h.finalize())[..16]);
        MasterKey { id, key }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key's line in a key file.
    fn encoded(&self) -> String {
        format!("{KEY_PREFIX}{}", B64.encode(self.key.0))
    }
}

/// Master keys, the current (wrapping) one first.
#[derive(Debug, Clone)]
pub struct MasterKeys {
    keys: Vec<MasterKey>,
}

impl MasterKeys {
    /// Parses keys separated by newlines or commas; blank entries and `#` comments are skipped.
    pub fn parse(text: &str, origin: &str) -> Result<MasterKeys, KeyringError> {
        let mut keys = Vec::new();
        for (i, entry) in text.split([',', '\n']).enumerate() {
            let entry = entry.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let malformed = || KeyringError::Malformed {
                origin: origin.to_owned(),
                entry: i + 1,
            };
            let b64 = entry.strip_prefix(KEY_PREFIX).ok_or_else(malformed)?;
            let raw = B64.decode(b64).map_err(|_| malformed())?;
            let bytes: [u8; 32] = raw.try_into().map_err(|_| malformed())?;
            keys.push(MasterKey::from_bytes(KeyBytes(bytes)));
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty {
                origin: origin.to_owned(),
            });
        }
        Ok(MasterKeys { keys })
    }

    pub fn load(source: &MasterKeySource) -> Result<MasterKeys, KeyringError> {
        match source {
            MasterKeySource::File(path) => {
                use std::os::unix::fs::PermissionsExt as _;
                if let Ok(meta) = std::fs::metadata(path) {
                    let mode = meta.permissions().mode();
                    if mode & 0o077 != 0 {
                        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the master key file is readable by other users; chmod 600 it");
                    }
                }
                let text =
                    std::fs::read_to_string(path).map_err(|source| KeyringError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                Self::parse(&text, &source_origin(path))
            }
            MasterKeySource::Env(text) => Self::parse(text, &source.origin()),
        }
    }

    pub fn current(&self) -> &MasterKey {
        &self.keys[0]
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    fn get(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// `new` becomes current; the others stay, in order, after it.
    pub fn with_current(&self, new: MasterKey) -> MasterKeys {
        let new_id = new.id.clone();
        let mut keys = vec![new];
        keys.extend(self.keys.iter().filter(|k| k.id != new_id).cloned());
        MasterKeys { keys }
    }

    /// Only the keys whose ids are in `keep` (and always the current one).
    pub fn retain(&self, keep: &[&str]) -> MasterKeys {
        let keys = self
            .keys
            .iter()
            .enumerate()
            .filter(|(i, k)| *i == 0 || keep.contains(&k.id.as_str()))
            .map(|(_, k)| k.clone())
            .collect();
        MasterKeys { keys }
    }

    /// Writes the keys to `path` atomically (a temporary file renamed over it), mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), KeyringError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let err = |source| KeyringError::WriteFile {
            path: path.to_owned(),
            source,
        };
        let mut text = String::from(
            "# Kiln master keys: the first wraps new data keys; the others still unwrap.\n",
        );
        for k in &self.keys {
            text.push_str(&format!("# {}\n{}\n", k.id, k.encoded()));
        }
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        Ok(())
    }
}

fn source_origin(path: &Path) -> String {
    path.display().to_string()
}

/// What a secret's ciphertext is bound to.
#[derive(Debug, Clone, Copy)]
pub struct SecretAad<'a> {
    pub org: &'a OrgId,
    pub app: &'a str,
    pub env: &'a str,
    pub name: &'a str,
    /// The secrets version that set the value.
    pub version: u64,
}

impl SecretAad<'_> {
    fn bytes(&self) -> Vec<u8> {
        format!(
            "kiln/secret/v1\0{}\0{}\0{}\0{}\0{}",
            self.org, self.app, self.env, self.name, self.version
        )
        .into_bytes()
    }
}

/// An org's data key, unwrapped (in memory only).
#[derive(Debug, Clone)]
pub struct DataKey {
    pub id: String,
    key: KeyBytes,
}

impl DataKey {
    pub fn seal(&self, aad: SecretAad<'_>, value: &[u8]) -> String {
        self.key.seal(&aad.bytes(), value)
    }

    pub fn open(&self, aad: SecretAad<'_>, blob: &str) -> Result<Vec<u8>, KeyringError> {
        self.key
            .open(&aad.bytes(), blob)
            .ok_or_else(|| KeyringError::Open {
                name: aad.name.to_owned(),
                data_key: self.id.clone(),
            })
    }

    /// A digest of a value keyed by the data key: equal values give equal digests within an
    /// org, and without the key the digest cannot be tested against guesses.
    pub fn digest(&self, name: &str, value: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(b"kiln/secret-digest/v1\0");
        h.update(self.key.0);
        h.update(name.as_bytes());
        h.update([0]);
        h.update(value);
        format!("sha256:{}", &hex::encode(h.finalize())[..16])
    }
}

fn data_key_aad(org: &OrgId, id: &str) -> Vec<u8> {
    format!("kiln/data-key/v1\0{org}\0{id}").into_bytes()
}

/// A data key freshly created for an org: the key (for use now) and what to record.
pub struct NewDataKey {
    pub key: DataKey,
    pub master_key_id: String,
    pub wrapped: String,
}

/// The control plane's master keys and a cache of unwrapped data keys.
pub struct Keyring {
    source: MasterKeySource,
    master: RwLock<MasterKeys>,
    data_keys: Mutex<HashMap<String, DataKey>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("source", &self.source.origin())
            .field("master_key_ids", &self.master_ids())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Keyring {
    pub fn open(source: MasterKeySource) -> Result<Arc<Keyring>, KeyringError> {
        let master = MasterKeys::load(&source)?;
        Ok(Arc::new(Keyring {
            source,
            master: RwLock::new(master),
            data_keys: Mutex::new(HashMap::new()),
        }))
    }

    pub fn master_ids(&self) -> Vec<String> {
        self.master
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .ids()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    pub fn current_master_id(&self) -> String {
        self.master
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current()
            .id
            .clone()
    }

    /// Re-reads a key file (a rotation may have added a key). A failed re-read keeps the keys
    /// already loaded.
    fn reload(&self) {
        if let MasterKeySource::File(_) = self.source {
            match MasterKeys::load(&self.source) {
                Ok(keys) => {
                    *self.master.write().unwrap_or_else(|e| e.into_inner()) = keys;
                }
                Err(e) => {
                    tracing::warn!(error = %kiln_types::error_chain(&e), "master key file not reloaded")
                }
            }
        }
    }

    /// A new random data key for `org`, wrapped by the current master key (re-read first, so a
    /// key created right after a rotation is wrapped by the new key).
    pub fn new_data_key(&self, org: &OrgId) -> NewDataKey {
        self.reload();
        let mut id_bytes = [0u8; 8];
        getrandom::fill(&mut id_bytes).expect("operating system random source");
        let key = DataKey {
            id: format!("dk_{}", hex::encode(id_bytes)),
            key: KeyBytes::random(),
        };
        let master = self.master.read().unwrap_or_else(|e| e.into_inner());
        let mk = master.current();
        let wrapped = mk.key.seal(&data_key_aad(org, &key.id), &key.key.0);
        lock(&self.data_keys).insert(key.id.clone(), key.clone());
        NewDataKey {
            master_key_id: mk.id.clone(),
            wrapped,
            key,
        }
    }

    /// Unwraps a stored data key (cached after the first time).
    pub fn data_key(
        &self,
        org: &OrgId,
        id: &str,
        master_key_id: &str,
        wrapped: &str,
    ) -> Result<DataKey, KeyringError> {
        if let Some(k) = lock(&self.data_keys).get(id) {
            return Ok(k.clone());
        }
        let has = |ring: &Keyring| {
            ring.master
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(master_key_id)
                .is_some()
        };
        if !has(self) {
            self.reload();
        }
        let master = self.master.read().unwrap_or_else(|e| e.into_inner());
        let mk = master
            .get(master_key_id)
            .ok_or_else(|| KeyringError::MissingMasterKey {
                master_key_id: master_key_id.to_owned(),
                data_key: id.to_owned(),
                origin: self.source.origin(),
            })?;
        let raw = mk
            .key
            .open(&data_key_aad(org, id), wrapped)
            .ok_or_else(|| KeyringError::Unwrap {
                master_key_id: master_key_id.to_owned(),
                data_key: id.to_owned(),
                origin: self.source.origin(),
            })?;
        let bytes: [u8; 32] = raw.try_into().map_err(|_| KeyringError::Encoding {
            data_key: id.to_owned(),
        })?;
        let key = DataKey {
            id: id.to_owned(),
            key: KeyBytes(bytes),
        };
        lock(&self.data_keys).insert(id.to_owned(), key.clone());
        Ok(key)
    }
}

/// Wraps `key` (already unwrapped) with `master` for a rotation.
pub fn rewrap(master: &MasterKey, org: &OrgId, key: &DataKey) -> String {
    master.key.seal(&data_key_aad(org, &key.id), &key.key.0)
}

/// Unwraps a stored data key with explicit master keys (the rotation tool, which has no
/// [`Keyring`]).
pub fn unwrap_with(
    keys: &MasterKeys,
    origin: &str,
    org: &OrgId,
    id: &str,
    master_key_id: &str,
    wrapped: &str,
) -> Result<DataKey, KeyringError> {
    let ring = Keyring {
        source: MasterKeySource::Env(String::new()),
        master: RwLock::new(keys.clone()),
        data_keys: Mutex::new(HashMap::new()),
    };
    ring.data_key(org, id, master_key_id, wrapped)
        .map_err(|e| match e {
            KeyringError::MissingMasterKey {
                master_key_id,
                data_key,
                ..
            } => KeyringError::MissingMasterKey {
                master_key_id,
                data_key,
                origin: origin.to_owned(),
            },
            KeyringError::Unwrap {
                master_key_id,
                data_key,
                ..
            } => KeyringError::Unwrap {
                master_key_id,
                data_key,
                origin: origin.to_owned(),
            },
            other => other,
        })
}

/// Writes a fresh key file at `path` unless one exists; returns whether it created one.
pub fn ensure_key_file(path: &Path) -> Result<bool, KeyringError> {
    if path.exists() {
        return Ok(false);
    }
    MasterKeys {
        keys: vec![MasterKey::generate()],
    }
    .write(path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_with(keys: &MasterKeys) -> (tempfile::TempDir, Arc<Keyring>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        keys.write(&path).unwrap();
        let ring = Keyring::open(MasterKeySource::File(path)).unwrap();
        (dir, ring)
    }

    fn aad<'a>(org: &'a OrgId, name: &'a str, version: u64) -> SecretAad<'a> {
        SecretAad {
            org,
            app: "app_1",
            env: "production",
            name,
            version,
        }
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let keys = MasterKeys {
            keys: vec![MasterKey::generate()],
        };
        let (_d, ring) = ring_with(&keys);
        let org = OrgId::generate();
        let dk = ring.new_data_key(&org);
        let blob = dk.key.seal(aad(&org, "A", 1), b"plain-value-123");
        assert!(!blob.contains("plain-value-123"));
        assert_eq!(
            dk.key.open(aad(&org, "A", 1), &blob).unwrap(),
            b"plain-value-123"
        );
        // Moved to another name, version or org: refused.
        assert!(dk.key.open(aad(&org, "B", 1), &blob).is_err());
        assert!(dk.key.open(aad(&org, "A", 2), &blob).is_err());
        let other = OrgId::generate();
        assert!(dk.key.open(aad(&other, "A", 1), &blob).is_err());
        assert!(dk.key.open(aad(&org, "A", 1), "!!!").is_err());
        assert!(dk.key.open(aad(&org, "A", 1), "").is_err());
        // A fresh ring (no cache) unwraps the stored form.
        let (_d2, ring2) = ring_with(&keys);
        let again = ring2
            .data_key(&org, &dk.key.id, &dk.master_key_id, &dk.wrapped)
            .unwrap();
        assert_eq!(
            again.open(aad(&org, "A", 1), &blob).unwrap(),
            b"plain-value-123"
        );
    }

    #[test]
    fn wrong_or_missing_master_key_is_named() {
        let org = OrgId::generate();
        let k1 = MasterKeys {
            keys: vec![MasterKey::generate()],
        };
        let (_d, ring) = ring_with(&k1);
        let dk = ring.new_data_key(&org);
        let k2 = MasterKeys {
            keys: vec![MasterKey::generate()],
        };
        let (_d2, other) = ring_with(&k2);
        let err = other
            .data_key(&org, &dk.key.id, &dk.master_key_id, &dk.wrapped)
            .unwrap_err();
        assert!(
            matches!(err, KeyringError::MissingMasterKey { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&dk.master_key_id), "{err}");
        // Same id, altered wrapped key: an unwrap failure naming the ids.
        let mut bad = B64.decode(&dk.wrapped).unwrap();
        bad[30] ^= 1;
        let err = ring
            .data_key(&org, "dk_other", &dk.master_key_id, &B64.encode(bad))
            .unwrap_err();
        assert!(matches!(err, KeyringError::Unwrap { .. }), "{err}");
        assert!(err.to_string().contains("dk_other"));
    }

    #[test]
    fn parse_rejects_junk_and_never_echoes_it() {
        for bad in [
            "",
            "# only a comment",
            "kiln-mk1:short",
            "secret-junk-value",
        ] {
            let err = MasterKeys::parse(bad, "test").unwrap_err();
            assert!(!err.to_string().contains("secret-junk"), "{err}");
        }
        let k = MasterKey::generate();
        let parsed = MasterKeys::parse(&format!("\n# c\n{}\n", k.encoded()), "t").unwrap();
        assert_eq!(parsed.current().id(), k.id());
        assert!(format!("{parsed:?}").contains("KeyBytes(..)"));
    }

    #[test]
    fn rewrap_keeps_the_data_key() {
        let org = OrgId::generate();
        let old = MasterKeys {
            keys: vec![MasterKey::generate()],
        };
        let (_d, ring) = ring_with(&old);
        let dk = ring.new_data_key(&org);
        let blob = dk.key.seal(aad(&org, "A", 1), b"v");
        let new = MasterKey::generate();
        let both = old.with_current(new.clone());
        let key =
            unwrap_with(&both, "t", &org, &dk.key.id, &dk.master_key_id, &dk.wrapped).unwrap();
        let wrapped = rewrap(both.current(), &org, &key);
        let only_new = both.retain(&[]);
        assert_eq!(only_new.ids(), vec![new.id()]);
        let again = unwrap_with(&only_new, "t", &org, &dk.key.id, new.id(), &wrapped).unwrap();
        assert_eq!(again.open(aad(&org, "A", 1), &blob).unwrap(), b"v");
    }
}
