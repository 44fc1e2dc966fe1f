//! Secrets: versioned, encrypted at rest, rolled out with releases (decision 0010).
//!
//! 1. A change (`set` or `unset`) validates names and sizes, seals each new value with the org's
//!    data key ([`keyring`]) and appends `secrets_set`/`secrets_unset` with the next version of the
//!    app environment's secrets, expecting the app stream's version (so two changes never get
//!    one version).
//! 2. In the same append, unless the change is staged or the app asked for
//!    `[secrets] reload = "signal"`, a `release_created` copies the serving release (same image,
//!    same manifest) with the new secrets version: the reconciler rolls it like any deploy.
//! 3. Every release pins the secrets version current when it was created; the instances of a
//!    release receive exactly that version (a rollback to an older release restores its secrets).
//!    With `reload = "signal"`, instances also receive newer unstaged versions in place.
//! 4. An agent fetches an instance's file ([`bundle`]), which appends `secrets_delivered`.
//!
//! Values exist in plaintext only in request bodies, in memory while sealing or opening, and in
//! the responses of `render --reveal` and of the agent's bundle. They are never logged.

pub mod keyring;
pub mod rotate;

use std::collections::{BTreeMap, HashMap};

use axum::http::StatusCode;

use kiln_store::{AppRow, ReleaseRow, SecretEntryRow};
use kiln_types::event::{Event, ReleaseState};
use kiln_types::secrets::{SecretName, SecretsFile, MAX_FILE_LEN, MAX_SECRETS, MAX_VALUE_LEN};
use kiln_types::{AppId, OrgId, ReleaseId};

use crate::error::ApiFailure;
use crate::Control;

pub use keyring::{
    ensure_key_file, Keyring, KeyringError, MasterKeySource, MasterKeys, MASTER_KEY_ENV,
};
use keyring::{DataKey, SecretAad};
pub use rotate::{rotate_master_key, RotateError, RotateReport};

type ApiResult<T> = Result<T, ApiFailure>;

impl Control {
    pub(crate) fn keyring(&self) -> ApiResult<&Keyring> {
        self.keyring.as_deref().ok_or_else(|| {
            ApiFailure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "secrets_unavailable",
                "this control plane has no master key configured, so it stores no secrets \
                 (start it with --master-key-file or KILN_MASTER_KEY)",
            )
        })
    }
}

/// A keyring failure: logged with its chain (key ids only) and answered with a stable code.
pub(crate) fn key_failure(e: &KeyringError) -> ApiFailure {
    let detail = kiln_types::error_chain(e);
    tracing::error!(error = %detail, "secrets keyring failure");
    ApiFailure::new(StatusCode::SERVICE_UNAVAILABLE, "master_key_error", detail)
}

/// The environment of a request; only `production` exists until environments do.
pub(crate) fn env_of(env: Option<&str>) -> ApiResult<String> {
    match env.unwrap_or(kiln_types::secrets::DEFAULT_ENV) {
        kiln_types::secrets::DEFAULT_ENV => Ok(kiln_types::secrets::DEFAULT_ENV.to_owned()),
        other => Err(ApiFailure::new(
            StatusCode::NOT_FOUND,
            "environment_not_found",
            format!("environment {other:?} does not exist (apps have only `production` so far)"),
        )),
    }
}

/// Parses a secret name from a request, with the name in the error (names are not secret).
pub(crate) fn parse_name(name: &str) -> ApiResult<SecretName> {
    name.parse()
        .map_err(|e: kiln_types::secrets::SecretNameError| {
            let shown: String = name.chars().take(64).collect();
            ApiFailure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_secret_name",
                format!("{shown:?}: {e}"),
            )
        })
}

pub(crate) fn check_value(name: &SecretName, value: &str) -> ApiResult<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "secret_too_large",
            format!(
                "secret {name} is {} bytes; a value has at most {MAX_VALUE_LEN}",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// The plaintext length of a sealed value, from its base64 length (nonce and tag removed).
fn sealed_len(ciphertext: &str) -> usize {
    (ciphertext.len() / 4 * 3).saturating_sub(24 + 16)
}

/// The org's data key, unwrapped; creates one (returning its event to append) on first use.
pub(crate) async fn data_key(
    c: &Control,
    org: &OrgId,
    create: bool,
) -> ApiResult<Option<(DataKey, Option<Event>)>> {
    let ring = c.keyring()?;
    let rows = c.store.data_keys_of_org(org.clone()).await?;
    if let Some(row) = rows.first() {
        let key = ring
            .data_key(org, &row.id, &row.master_key_id, &row.wrapped)
            .map_err(|e| key_failure(&e))?;
        return Ok(Some((key, None)));
    }
    if !create {
        return Ok(None);
    }
    let new = ring.new_data_key(org);
    let event = Event::DataKeyCreated {
        org_id: org.clone(),
        key_id: new.key.id.clone(),
        master_key_id: new.master_key_id,
        wrapped: new.wrapped,
    };
    Ok(Some((new.key, Some(event))))
}

/// Opens the given entries (all of one org) into name → value.
pub(crate) async fn open_entries(
    c: &Control,
    org: &OrgId,
    app: &AppId,
    env: &str,
    entries: &[SecretEntryRow],
) -> ApiResult<BTreeMap<String, String>> {
    let ring = c.keyring()?;
    let mut keys: HashMap<String, DataKey> = HashMap::new();
    let mut out = BTreeMap::new();
    for e in entries {
        if !keys.contains_key(&e.key_id) {
            let rows = c.store.data_keys_of_org(org.clone()).await?;
            let row = rows.iter().find(|r| r.id == e.key_id).ok_or_else(|| {
                key_failure(&KeyringError::Encoding {
                    data_key: e.key_id.clone(),
                })
            })?;
            let key = ring
                .data_key(org, &row.id, &row.master_key_id, &row.wrapped)
                .map_err(|err| key_failure(&err))?;
            keys.insert(e.key_id.clone(), key);
        }
        let key = &keys[&e.key_id];
        let aad = SecretAad {
            org,
            app: app.as_str(),
            env,
            name: e.name.as_str(),
            version: e.version,
        };
        let plain = key
            .open(aad, &e.ciphertext)
            .map_err(|err| key_failure(&err))?;
        let value = String::from_utf8(plain).map_err(|_| {
            key_failure(&KeyringError::Open {
                name: e.name.to_string(),
                data_key: e.key_id.clone(),
            })
        })?;
        out.insert(e.name.to_string(), value);
    }
    Ok(out)
}

/// What a change does.
pub(crate) enum Change {
    Set(BTreeMap<SecretName, String>),
    Unset(Vec<SecretName>),
}

/// The outcome of an applied change.
pub(crate) struct Applied {
    pub version: u64,
    pub rollout: &'static str,
    pub release_version: Option<u64>,
}

/// The release a secrets change rolls from: the newest one serving or being deployed.
fn serving_release(releases: &[ReleaseRow]) -> Option<&ReleaseRow> {
    releases
        .iter()
        .rev()
        .find(|r| matches!(r.state, ReleaseState::Healthy | ReleaseState::Deploying))
}

/// `[secrets] reload` of a release's manifest.
pub(crate) fn reload_of(release: &ReleaseRow) -> kiln_manifest::SecretsReload {
    serde_json::from_value::<kiln_manifest::Secrets>(release.manifest["secrets"].clone())
        .map(|s| s.reload)
        .unwrap_or_default()
}

/// Applies a change: one append with the secrets event (and the data key and rollout release
/// when needed), retried on a concurrent change of the app.
pub(crate) async fn apply(
    c: &Control,
    app: &AppRow,
    env: &str,
    change: Change,
    staged: bool,
    metadata: kiln_store::Metadata,
) -> ApiResult<Applied> {
    use kiln_store::{Append, ExpectedVersion, NewEvent};
    let stream = kiln_types::event::StreamRef {
        kind: kiln_types::event::StreamType::App,
        id: app.id.to_string(),
    };
    for _ in 0..5 {
        let stream_version = c.store.stream_version(stream.clone()).await?;
        let current = c
            .store
            .secret_env(app.id.clone(), env.to_owned())
            .await?
            .map(|r| r.version)
            .unwrap_or(0);
        let version = current + 1;
        let existing = c
            .store
            .secrets_at(app.id.clone(), env.to_owned(), current)
            .await?;
        let mut events = Vec::new();
        let secrets_event = match &change {
            Change::Set(values) => {
                let mut sizes: BTreeMap<&str, usize> = existing
                    .iter()
                    .map(|e| (e.name.as_str(), sealed_len(&e.ciphertext)))
                    .collect();
                for (n, v) in values {
                    sizes.insert(n.as_str(), v.len());
                }
                check_totals(&sizes)?;
                let (key, created) = data_key(c, &app.org_id, true).await?.ok_or_else(|| {
                    ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no data key")
                })?;
                events.extend(created.map(NewEvent::any));
                let secrets = values
                    .iter()
                    .map(|(name, value)| {
                        let aad = SecretAad {
                            org: &app.org_id,
                            app: app.id.as_str(),
                            env,
                            name: name.as_str(),
                            version,
                        };
                        kiln_types::secrets::SealedSecret {
                            name: name.clone(),
                            key_id: key.id.clone(),
                            ciphertext: key.seal(aad, value.as_bytes()),
                            digest: key.digest(name.as_str(), value.as_bytes()),
                        }
                    })
                    .collect();
                Event::SecretsSet {
                    app_id: app.id.clone(),
                    env: env.to_owned(),
                    version,
                    secrets,
                    staged,
                }
            }
            Change::Unset(names) => {
                let missing: Vec<&str> = names
                    .iter()
                    .filter(|n| !existing.iter().any(|e| &e.name == *n))
                    .map(|n| n.as_str())
                    .collect();
                if !missing.is_empty() {
                    return Err(ApiFailure::new(
                        StatusCode::NOT_FOUND,
                        "secret_not_found",
                        format!("no secret named {} in {env}", missing.join(", ")),
                    ));
                }
                Event::SecretsUnset {
                    app_id: app.id.clone(),
                    env: env.to_owned(),
                    version,
                    names: names.clone(),
                    staged,
                }
            }
        };
        events.push(NewEvent {
            event: secrets_event,
            expected: ExpectedVersion::Exact(stream_version),
        });
        let releases = c.store.releases(app.id.clone()).await?;
        let mut rollout = "none";
        let mut release_version = None;
        if let Some(serving) = serving_release(&releases).filter(|_| !staged) {
            match reload_of(serving) {
                kiln_manifest::SecretsReload::Signal => rollout = "signal",
                kiln_manifest::SecretsReload::Restart => {
                    rollout = "restart";
                    let v = app
                        .release_count
                        .max(releases.last().map_or(0, |r| r.version))
                        + 1;
                    release_version = Some(v);
                    events.push(NewEvent::any(Event::ReleaseCreated {
                        app_id: app.id.clone(),
                        release_id: ReleaseId::generate(),
                        version: v,
                        image_input: serving.image_input.clone(),
                        image: serving.image.clone(),
                        manifest: serving.manifest.clone(),
                        manifest_source: serving.manifest_source.clone(),
                        secrets_version: version,
                    }));
                }
            }
        }
        let res = c
            .store
            .append(Append {
                events,
                metadata: metadata.clone(),
                idempotency: None,
            })
            .await;
        match res {
            Ok(_) => {
                return Ok(Applied {
                    version,
                    rollout,
                    release_version,
                })
            }
            Err(kiln_store::StoreError::VersionConflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiFailure::new(
        StatusCode::CONFLICT,
        "conflict",
        "too many concurrent changes of this app; retry",
    ))
}

fn check_totals(sizes: &BTreeMap<&str, usize>) -> ApiResult<()> {
    if sizes.len() > MAX_SECRETS {
        return Err(ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_secrets",
            format!(
                "an environment holds at most {MAX_SECRETS} secrets; this change makes {}",
                sizes.len()
            ),
        ));
    }
    // JSON overhead per entry: quotes, colon, comma and some escaping headroom.
    let total: usize = 64 + sizes.iter().map(|(n, v)| n.len() + v + 8).sum::<usize>();
    if total > MAX_FILE_LEN {
        return Err(ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "secrets_file_too_large",
            format!(
                "the secrets file would be about {total} bytes; it holds at most {MAX_FILE_LEN}"
            ),
        ));
    }
    Ok(())
}

/// The secrets file of an app environment at `version`, values in plaintext.
pub(crate) async fn file_at(
    c: &Control,
    app: &AppRow,
    env: &str,
    version: u64,
) -> ApiResult<SecretsFile> {
    let entries = c
        .store
        .secrets_at(app.id.clone(), env.to_owned(), version)
        .await?;
    let secrets = open_entries(c, &app.org_id, &app.id, env, &entries).await?;
    Ok(SecretsFile {
        version,
        app: app.name.clone(),
        env: env.to_owned(),
        secrets,
    })
}

/// The version an instance of `release` should hold now: the release's pin, or, with
/// `reload = "signal"`, the newest unstaged version if that is newer.
pub(crate) async fn version_for(c: &Control, app: &AppId, release: &ReleaseRow) -> ApiResult<u64> {
    let pinned = release.secrets_version;
    if reload_of(release) != kiln_manifest::SecretsReload::Signal || pinned == 0 {
        return Ok(pinned);
    }
    let live = c
        .store
        .secret_env(app.clone(), kiln_types::secrets::DEFAULT_ENV.to_owned())
        .await?
        .map_or(0, |r| r.live_version);
    Ok(pinned.max(live))
}

/// For instances whose release replaces secrets in place, the version each should hold now
/// (others hold their spec's version and are left out).
pub(crate) async fn assigned_versions(
    c: &Control,
    rows: &[kiln_store::InstanceRow],
) -> ApiResult<HashMap<kiln_types::InstanceId, u64>> {
    let mut out = HashMap::new();
    let mut releases: HashMap<(AppId, u64), Option<ReleaseRow>> = HashMap::new();
    for i in rows.iter().filter(|i| i.spec.secrets.version > 0) {
        let key = (i.app_id.clone(), i.release_version);
        if !releases.contains_key(&key) {
            let r = c.store.release(i.app_id.clone(), i.release_version).await?;
            releases.insert(key.clone(), r);
        }
        if let Some(Some(release)) = releases.get(&key) {
            out.insert(i.id.clone(), version_for(c, &i.app_id, release).await?);
        }
    }
    Ok(out)
}
