//! The org's view of the event log: list with a cursor, or follow as JSON lines.

use std::collections::BTreeSet;

use axum::response::IntoResponse;
use kiln_store::RecordedEvent;
use kiln_types::OrgId;

use super::*;

/// Most log entries one list request scans (matching or not), so a request of an org with few
/// events in a long log stays bounded; the cursor tells where to go on.
const SCAN_BUDGET: usize = 5_000;
/// A quiet follow stream sends an empty line this often.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Log entries read per store query.
const READ_PAGE: usize = 500;

/// Whose an event is.
enum Owner<'a> {
    Org(&'a OrgId),
    App(&'a AppId),
    /// Hosts: the operator's.
    Platform,
}

fn owner(e: &Event) -> Owner<'_> {
    match e {
        Event::OrgCreated { org_id, .. }
        | Event::TokenCreated { org_id, .. }
        | Event::AuditRecorded { org_id, .. }
        | Event::TokenRevoked { org_id, .. }
        | Event::TokenUsed { org_id, .. }
        | Event::MembershipGranted { org_id, .. }
        | Event::MembershipRevoked { org_id, .. }
        | Event::DataKeyCreated { org_id, .. }
        | Event::DataKeyRewrapped { org_id, .. }
        | Event::OrgQuotasSet { org_id, .. } => Owner::Org(org_id),
        Event::AppCreated { app_id, .. }
        | Event::AppDestroyed { app_id, .. }
        | Event::ReleaseCreated { app_id, .. }
        | Event::ReleaseStateChanged { app_id, .. }
        | Event::InstanceStateChanged { app_id, .. }
        | Event::InstanceStopRequested { app_id, .. }
        | Event::PortAllocated { app_id, .. }
        | Event::PortReleased { app_id, .. }
        | Event::Ipv4Allocated { app_id, .. }
        | Event::Ipv4Released { app_id, .. }
        | Event::DomainAdded { app_id, .. }
        | Event::DomainVerified { app_id, .. }
        | Event::DomainRemoved { app_id, .. }
        | Event::SecretsSet { app_id, .. }
        | Event::SecretsUnset { app_id, .. }
        | Event::SecretsDelivered { app_id, .. }
        | Event::VolumeCreated { app_id, .. }
        | Event::VolumeDeleted { app_id, .. } => Owner::App(app_id),
        Event::InstancePlaced { spec, .. } => Owner::App(&spec.app_id),
        // Users may belong to several orgs: platform-level, like hosts.
        Event::HostRegistered { .. }
        | Event::HostStateChanged { .. }
        | Event::UserCreated { .. } => Owner::Platform,
    }
}

/// What one caller may see: its org's events, its apps' events, and (operator) the platform's.
struct Visibility {
    org: OrgId,
    apps: BTreeSet<AppId>,
    operator: bool,
}

impl Visibility {
    async fn of(c: &Control, p: &Principal) -> ApiResult<Self> {
        let apps = c
            .store
            .apps(Some(p.org_id.clone()))
            .await?
            .into_iter()
            .map(|a| a.id)
            .collect();
        Ok(Visibility {
            org: p.org_id.clone(),
            apps,
            operator: &p.org_id == operator(c).await?,
        })
    }

    /// Whether the caller sees `e`; learns the org's apps created meanwhile (follow).
    fn sees(&mut self, e: &Event) -> bool {
        if let Event::AppCreated { app_id, org_id, .. } = e {
            if *org_id == self.org {
                self.apps.insert(app_id.clone());
            }
        }
        match owner(e) {
            Owner::Org(o) => *o == self.org,
            Owner::App(a) => self.apps.contains(a),
            Owner::Platform => self.operator,
        }
    }
}

fn record(e: RecordedEvent) -> EventRecord {
    let (type_name, mut data) = e.event.to_parts();
    // Token hashes stay inside the control plane.
    if let Some(obj) = data.as_object_mut() {
        obj.remove("hash");
        // Password hashes and wrapped data keys too: secret material, even if encrypted.
        obj.remove("password_hash");
        obj.remove("wrapped");
    }
    EventRecord {
        seq: e.seq,
        type_: type_name.to_owned(),
        stream: e.stream.kind.as_str().to_owned(),
        stream_id: e.stream.id,
        data,
        actor: e.metadata.actor,
        request_id: e.metadata.request_id,
        recorded_at: e.recorded_at,
    }
}

fn seq_cursor(seq: u64) -> String {
    encode_cursor("events", &seq.to_string())
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    security(("bearer" = ["read"])),
    responses((status = 200, description = "A page of the org's events, oldest first; with \
        `follow=true`, JSON lines of `EventRecord` as they are recorded (the response stays open).",
        content(
            (EventPage = "application/json"),
            (EventRecord = "application/x-ndjson"),
        ))))]
pub(super) async fn list_events(
    State(c): Ctl,
    p: Principal,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    p.require(Scope::Read)?;
    let after: u64 = match q.cursor.as_deref() {
        None => 0,
        Some(cur) => decode_cursor("events", cur)?.parse().map_err(|_| {
            ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "invalid_cursor",
                "the cursor is not a `next_cursor` of this list",
            )
        })?,
    };
    let limit = page_limit(q.limit)?;
    let mut vis = Visibility::of(&c, &p).await?;
    if q.follow.unwrap_or(false) {
        return Ok(follow(c, vis, after));
    }
    let mut items = Vec::new();
    let mut position = after;
    let mut scanned = 0;
    'scan: while scanned < SCAN_BUDGET {
        let batch = c.store.read_after(position, READ_PAGE).await?;
        if batch.is_empty() {
            break;
        }
        for e in batch {
            scanned += 1;
            position = e.seq;
            if vis.sees(&e.event) {
                items.push(record(e));
                if items.len() == limit {
                    break 'scan;
                }
            }
        }
    }
    let page = EventPage {
        items,
        next_cursor: seq_cursor(position),
    };
    Ok(Json(page).into_response())
}

/// Streams visible events after `after` as JSON lines until the client goes away.
fn follow(c: Arc<Control>, mut vis: Visibility, after: u64) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let mut head = c.store.subscribe();
        let mut position = after;
        loop {
            let batch = match c.store.read_after(position, READ_PAGE).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %crate::error::error_chain(&e), "event follower stopped");
                    return;
                }
            };
            let full = batch.len() == READ_PAGE;
            for e in batch {
                position = e.seq;
                if vis.sees(&e.event) {
                    let mut line = serde_json::to_vec(&record(e)).unwrap_or_default();
                    line.push(b'\n');
                    if tx.send(Ok(line)).await.is_err() {
                        return;
                    }
                }
            }
            if full {
                continue;
            }
            // Decide first, then act: the head's borrow must not live across the send.
            let quiet = tokio::select! {
                changed = head.wait_for(|h| *h > position) => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = tokio::time::sleep(KEEPALIVE) => true,
                _ = tx.closed() => return,
            };
            // An empty line now and then keeps idle proxies from closing a quiet stream.
            if quiet && tx.send(Ok(b"\n".to_vec())).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_default()
}
