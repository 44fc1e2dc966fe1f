//! Master key rotation (`kilnd control keys rotate`).
//!
//! 1. A new master key is generated and written first in the key file, the old keys after it
//!    (atomic rename): from then on, a control plane that meets the new key id re-reads the file,
//!    and new data keys are wrapped by the new key.
//! 2. Every data key not wrapped by the new key is unwrapped with the old key and wrapped with the
//!    new one (`data_key_rewrapped`, one event per data key). Secret ciphertexts do not change.
//! 3. With `drop_old`, once no data key is wrapped by an old key any more, the old keys are removed
//!    from the file; otherwise they stay (harmless: nothing refers to them) until a later rotation
//!    drops them.

use std::path::Path;

use kiln_store::{Append, Metadata, NewEvent, Store};
use kiln_types::event::Event;

use super::keyring::{self, KeyringError, MasterKey, MasterKeys};

/// A rotation failed; the key file and the store are left consistent (every data key is
/// wrapped by a key the file holds).
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("master key rotation: key handling failed")]
    Key {
        #[source]
        source: KeyringError,
    },
    #[error("master key rotation: store operation {op} failed")]
    Store {
        op: &'static str,
        #[source]
        source: kiln_store::StoreError,
    },
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateReport {
    pub new_key_id: String,
    pub previous_key_ids: Vec<String>,
    pub rewrapped: usize,
    /// The key ids the file holds afterwards, current first.
    pub file_key_ids: Vec<String>,
}

pub async fn rotate_master_key(
    store: &Store,
    key_file: &Path,
    drop_old: bool,
) -> Result<RotateReport, RotateError> {
    let key_err = |source| RotateError::Key { source };
    let origin = key_file.display().to_string();
    let old =
        MasterKeys::load(&keyring::MasterKeySource::File(key_file.to_owned())).map_err(key_err)?;
    let previous_key_ids: Vec<String> = old.ids().into_iter().map(str::to_owned).collect();
    let new = MasterKey::generate();
    let keys = old.with_current(new.clone());
    keys.write(key_file).map_err(key_err)?;
    let mut rewrapped = 0;
    // Repeat until nothing is left under an old key: a control plane that created a data key
    // before it saw the new file wrapped it with the old key.
    for _ in 0..3 {
        let rows = store
            .all_data_keys()
            .await
            .map_err(|source| RotateError::Store {
                op: "list data keys",
                source,
            })?;
        let stale: Vec<_> = rows
            .into_iter()
            .filter(|r| r.master_key_id != new.id())
            .collect();
        if stale.is_empty() {
            break;
        }
        let mut events = Vec::with_capacity(stale.len());
        for row in &stale {
            let key = keyring::unwrap_with(
                &keys,
                &origin,
                &row.org_id,
                &row.id,
                &row.master_key_id,
                &row.wrapped,
            )
            .map_err(key_err)?;
            events.push(NewEvent::any(Event::DataKeyRewrapped {
                org_id: row.org_id.clone(),
                key_id: row.id.clone(),
                master_key_id: new.id().to_owned(),
                wrapped: keyring::rewrap(&new, &row.org_id, &key),
            }));
        }
        rewrapped += events.len();
        store
            .append(Append {
                events,
                metadata: Metadata {
                    actor: "system:keys-rotate".into(),
                    ..Default::default()
                },
                idempotency: None,
            })
            .await
            .map_err(|source| RotateError::Store {
                op: "append data_key_rewrapped",
                source,
            })?;
        tracing::info!(count = stale.len(), master_key_id = %new.id(), "data keys rewrapped");
    }
    let mut file_keys = keys;
    if drop_old {
        let in_use: Vec<String> = store
            .all_data_keys()
            .await
            .map_err(|source| RotateError::Store {
                op: "list data keys",
                source,
            })?
            .into_iter()
            .map(|r| r.master_key_id)
            .collect();
        let keep: Vec<&str> = in_use.iter().map(String::as_str).collect();
        file_keys = file_keys.retain(&keep);
        file_keys.write(key_file).map_err(key_err)?;
    }
    Ok(RotateReport {
        new_key_id: new.id().to_owned(),
        previous_key_ids,
        rewrapped,
        file_key_ids: file_keys.ids().into_iter().map(str::to_owned).collect(),
    })
}
