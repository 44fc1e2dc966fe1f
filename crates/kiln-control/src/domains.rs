//! Custom domains: proving that a tenant controls a hostname, and the rules of who may hold one.
//! The routes are in `api::domains`; the edges route verified domains (`api::edge`).
//!
//! 1. `domain_added` records the claim with a random token; nothing is routed.
//! 2. Verification looks `_kiln-challenge.<hostname> TXT` up through the configured resolver
//!    (`ControlConfig::dns_resolver`) and appends `domain_verified` when a record holds
//!    `kiln-verify=<token>`. It runs on request (`POST .../verify`) and in the background
//!    ([`run_checks`]) with a backoff per domain.
//! 3. A hostname is verified by one app at most, platform-wide: the request is refused when
//!    another app holds it, and two racing verifications are settled by the domains view's unique
//!    index (the loser's append fails whole). A verified claim is never taken over: the holder
//!    must remove it first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;

use kiln_api::domains::{DnsRecord, Domain, DomainStatus};
use kiln_store::{AppRow, Append, DomainRow, Metadata, NewEvent};
use kiln_types::dns::CHALLENGE_PREFIX;
use kiln_types::event::Event;

use crate::dns::{lookup_txt, TxtAnswer};
use crate::error::ApiFailure;
use crate::Control;

/// Most domains one app may hold (verified or not).
pub(crate) const MAX_PER_APP: usize = 100;

/// A new challenge token: 160 random bits in lowercase base32 (32 characters).
pub(crate) fn new_token() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).unwrap_or_default();
    raw.iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 31)]))
        .collect()
}

/// The API's view of a domain row.
pub(crate) fn view(c: &Control, app: &AppRow, d: &DomainRow) -> Domain {
    Domain {
        hostname: d.hostname.clone(),
        app: app.name.clone(),
        env: d.env.clone(),
        status: if d.verified_at.is_some() {
            DomainStatus::Verified
        } else {
            DomainStatus::Pending
        },
        created_at: d.created_at,
        verified_at: d.verified_at,
        challenge: DnsRecord {
            name: d.hostname.challenge_name(),
            kind: "TXT".into(),
            value: format!("{CHALLENGE_PREFIX}{}", d.token),
        },
        traffic: DnsRecord {
            name: d.hostname.to_string(),
            kind: "CNAME".into(),
            value: format!("{}.{}", app.name, c.config.app_domain),
        },
    }
}

/// Refuses when another app holds `d.hostname` verified.
pub(crate) async fn check_not_taken(c: &Control, d: &DomainRow) -> Result<(), ApiFailure> {
    let holder = c
        .store
        .domains_by_hostname(d.hostname.as_str())
        .await?
        .into_iter()
        .find(|o| o.verified_at.is_some() && o.app_id != d.app_id);
    match holder {
        Some(_) => Err(taken(d.hostname.as_str())),
        None => Ok(()),
    }
}

pub(crate) fn taken(hostname: &str) -> ApiFailure {
    ApiFailure::new(
        StatusCode::CONFLICT,
        "domain_taken",
        format!(
            "{hostname} is verified by another app; its owner must remove it (kiln domains remove) before another app can claim it"
        ),
    )
}

/// Looks the challenge up and, when it matches, appends `domain_verified`. Returns the row as
/// it is now (verified) or the refusal saying what DNS answered.
pub(crate) async fn verify(
    c: &Control,
    d: &DomainRow,
    metadata: Metadata,
) -> Result<DomainRow, ApiFailure> {
    if d.verified_at.is_some() {
        return Ok(d.clone());
    }
    check_not_taken(c, d).await?;
    let Some(resolver) = c.config.dns_resolver else {
        return Err(ApiFailure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "dns_unavailable",
            "this control plane has no DNS resolver to verify domains with (start it with --dns-resolver)",
        ));
    };
    let name = d.hostname.challenge_name();
    let expected = format!("{CHALLENGE_PREFIX}{}", d.token);
    let answer = lookup_txt(resolver, &name).await.map_err(|e| {
        if log_allowed() {
            tracing::warn!(hostname = %d.hostname, error = %crate::error::error_chain(&e), "domain verification: DNS lookup failed");
        }
        ApiFailure::new(
            StatusCode::BAD_GATEWAY,
            "dns_lookup_failed",
            format!(
                "cannot look {name} TXT up: {}; retry later",
                crate::error::error_chain(&e)
            ),
        )
    })?;
    if !answer.records.iter().any(|r| r.trim() == expected) {
        return Err(not_verified(&name, &expected, &answer));
    }
    let res = c
        .store
        .append(Append {
            events: vec![NewEvent::any(Event::DomainVerified {
                app_id: d.app_id.clone(),
                env: d.env.clone(),
                hostname: d.hostname.clone(),
            })],
            metadata,
            idempotency: None,
        })
        .await;
    match res {
        Ok(out) => {
            tracing::info!(hostname = %d.hostname, app_id = %d.app_id, "domain verified");
            Ok(DomainRow {
                verified_at: out.events.first().map(|e| e.recorded_at),
                ..d.clone()
            })
        }
        // The view's unique index: another app verified it in between.
        Err(kiln_store::StoreError::ApplyView { .. }) => Err(taken(d.hostname.as_str())),
        Err(e) => Err(e.into()),
    }
}

/// At most 10 warnings a second about failed lookups: tenants trigger verifications.
fn log_allowed() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let now = kiln_types::now_millis().max(0) as u64 / 1000;
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        COUNT.store(0, Ordering::Relaxed);
    }
    COUNT.fetch_add(1, Ordering::Relaxed) < 10
}

fn not_verified(name: &str, expected: &str, answer: &TxtAnswer) -> ApiFailure {
    // Records are shown as DNS answered them, cut short: a zone can hold anything.
    let found: Vec<String> = answer
        .records
        .iter()
        .take(10)
        .map(|r| r.chars().take(200).collect())
        .collect();
    let what = if found.is_empty() {
        format!("no TXT record ({})", answer.rcode)
    } else {
        format!("{found:?}")
    };
    let mut f = ApiFailure::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "domain_not_verified",
        format!(
            "DNS has {what} at {name}; create the record {name} TXT \"{expected}\" at your DNS provider, wait for it to propagate, then verify again"
        ),
    );
    f.errors = Some(serde_json::json!({
        "record": name,
        "expected": expected,
        "rcode": answer.rcode.to_string(),
        "found": found,
    }));
    f
}

/// When the background re-check looks at pending domains.
#[derive(Debug, Clone, Copy)]
pub struct CheckSchedule {
    /// How often the list of pending domains is read.
    pub tick: Duration,
    /// First re-check of a pending domain this long after the checker first sees it, the delay
    /// doubled after each miss up to `max`.
    pub first: Duration,
    pub max: Duration,
    /// Domains pending longer than this are left to explicit verifies.
    pub give_up_after: Duration,
}

impl Default for CheckSchedule {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(5),
            first: Duration::from_secs(15),
            max: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Re-checks pending domains in the background until the task is dropped. The schedule is in
/// memory: a restart checks every pending domain again soon, which is harmless.
pub async fn run_checks(control: Arc<Control>, every: CheckSchedule) {
    // (app, hostname) -> (next check, current delay)
    let mut schedule: HashMap<(String, String), (tokio::time::Instant, Duration)> = HashMap::new();
    let mut tick = tokio::time::interval(every.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if control.config.dns_resolver.is_none() {
            continue;
        }
        let pending = match control.store.pending_domains().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "domain re-check: cannot read pending domains");
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        let wall = control.config.clock.now_millis();
        let keys: std::collections::HashSet<(String, String)> = pending
            .iter()
            .map(|d| (d.app_id.to_string(), d.hostname.to_string()))
            .collect();
        schedule.retain(|k, _| keys.contains(k));
        for d in pending {
            let age = Duration::from_millis(u64::try_from(wall - d.created_at).unwrap_or(0));
            if age > every.give_up_after {
                continue;
            }
            let key = (d.app_id.to_string(), d.hostname.to_string());
            let (next, delay) = *schedule
                .entry(key.clone())
                .or_insert((now + every.first, every.first));
            if next > now {
                continue;
            }
            let metadata = Metadata {
                actor: "system:domain-check".into(),
                ..Default::default()
            };
            match verify(&control, &d, metadata).await {
                Ok(_) => {
                    schedule.remove(&key);
                }
                Err(f) => {
                    tracing::debug!(hostname = %d.hostname, code = f.code, "domain re-check: not verified yet");
                    let delay = (delay * 2).min(every.max);
                    schedule.insert(key, (now + delay, delay));
                }
            }
        }
    }
}
