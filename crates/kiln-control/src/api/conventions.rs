//! What every route gets, as layers around the handlers (outermost first):
//!
//! 1. `x-request-id`: the caller's if sane, else a fresh one; on every response.
//! 2. Problems: any error response that is not `application/problem+json` yet (axum's own
//!    rejections: bad JSON, wrong types, oversized bodies, unknown routes, wrong methods) becomes
//!    one with a stable `code`; every problem gets the request id.
//! 3. Rate limit: a token bucket per bearer token (bounded memory); 429 `rate_limited` with
//!    `Retry-After`.
//! 4. Idempotency: a POST with `Idempotency-Key` is answered once; a retry with the same body
//!    replays the stored answer, another body is 422 `idempotency_key_reused`.
//! 5. Audit: every authenticated mutation appends an `audit_recorded` event with actor, action
//!    and outcome.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::{header, Method, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::*;
use crate::error::ProblemCode;

/// Largest request body accepted (bytes); larger ones are 413 `body_too_large`.
pub(crate) const MAX_BODY: usize = 2 * 1024 * 1024;

/// Gives every response an `x-request-id` (the caller's, if it sent a sane one).
pub(super) async fn request_id(mut req: Request<Body>, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", kiln_types::InstanceId::generate().suffix()));
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("req"));
    // Handlers read it from the headers (event metadata): a generated id is recorded too.
    req.headers_mut().insert(REQUEST_ID, value.clone());
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(REQUEST_ID, value);
    resp
}

/// The code of an error answered by axum itself (a rejected extractor, no route, wrong method).
fn rejection_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "no_route",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        s if s.is_server_error() => "internal",
        _ => "http_error",
    }
}

/// Turns every error response into `application/problem+json` carrying the request id.
pub(super) async fn problems(req: Request<Body>, next: Next) -> Response {
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let content_type = resp.headers().get(header::CONTENT_TYPE);
    let is_problem = content_type.is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    // Only axum's own rejections (plain text or empty) become problems: answers a protocol
    // defines otherwise (RFC 8628's OAuth errors, the device page's HTML) stay as they are.
    if !is_problem && content_type.is_some_and(|v| !v.as_bytes().starts_with(b"text/plain")) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Error bodies are small; anything larger is cut (and is not ours to keep anyway).
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut problem = if is_problem {
        match serde_json::from_slice::<Problem>(&bytes) {
            Ok(p) => p,
            Err(_) => return Response::from_parts(parts, Body::from(bytes)),
        }
    } else {
        let code = rejection_code(status);
        let text = String::from_utf8_lossy(&bytes);
        let detail = match (status, text.trim()) {
            (StatusCode::NOT_FOUND, "") => "no such route; see docs/specs/api/http-api.md".into(),
            (StatusCode::METHOD_NOT_ALLOWED, "") => "the route does not take this method".into(),
            (_, "") => status.canonical_reason().unwrap_or("error").to_owned(),
            (_, t) => t.chars().take(500).collect(),
        };
        parts.extensions.insert(ProblemCode(code));
        Problem {
            type_: format!("https://kiln.dev/problems/{code}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            code: code.to_owned(),
            detail: Some(detail),
            errors: None,
            request_id: None,
        }
    };
    problem.request_id = request_id;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    Response::from_parts(parts, Body::from(body))
}

/// Per-caller request rate: a token bucket per bearer token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
    /// Most callers tracked at once. Buckets that refilled are forgotten first (losslessly);
    /// a request from a new caller while all are busy is refused.
    pub max_callers: usize,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 50.0,
            burst: 200,
            max_callers: 10_000,
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by a hash of the bearer token (no store lookup before the limit).
pub(crate) struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<[u8; 16], Bucket>>,
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` to go ahead, or `Err(wait)` until one request is allowed again.
    fn check(&self, key: [u8; 16], now: Instant) -> Result<(), Duration> {
        let l = self.limit;
        let burst = f64::from(l.burst.max(1));
        let rate = l.per_second.max(0.001);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(&key) && buckets.len() >= l.max_callers {
            let refill = Duration::from_secs_f64(burst / rate);
            buckets.retain(|_, b| now.duration_since(b.at) < refill);
            if buckets.len() >= l.max_callers {
                return Err(Duration::from_secs(1));
            }
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

fn caller_key(req: &Request<Body>) -> [u8; 16] {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or(b"");
    let digest = Sha256::digest(auth);
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

pub(super) async fn rate_limit(State(c): Ctl, req: Request<Body>, next: Next) -> Response {
    if req.uri().path() == "/v1/healthz" {
        return next.run(req).await;
    }
    match c.rate_limiter.check(caller_key(&req), Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut resp = ApiFailure::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests with this token; retry in {secs} s"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
    }
}

/// How long a stored answer to an `Idempotency-Key` is replayed.
pub(crate) const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Largest answer stored for replay; a larger one is not stored (a retry runs again).
const IDEMPOTENCY_MAX_ANSWER: usize = 64 * 1024;
/// Total bytes of stored answers; the oldest are forgotten first beyond it.
const IDEMPOTENCY_BUDGET: usize = 32 * 1024 * 1024;
/// Longest key accepted.
const IDEMPOTENCY_KEY_MAX: usize = 255;

#[derive(Clone)]
struct Stored {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    etag: Option<HeaderValue>,
    body: Bytes,
}

enum Slot {
    Running {
        fingerprint: [u8; 32],
    },
    Done {
        fingerprint: [u8; 32],
        answer: Stored,
    },
}

/// Answers to `Idempotency-Key`s, in memory, for [`IDEMPOTENCY_TTL`], within a byte budget.
#[derive(Default)]
pub(crate) struct IdempotencyCache {
    inner: Mutex<IdemInner>,
}

#[derive(Default)]
struct IdemInner {
    slots: HashMap<[u8; 32], (Slot, Instant)>,
    order: VecDeque<([u8; 32], Instant)>,
    bytes: usize,
}

impl IdemInner {
    fn evict(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front().copied() {
            let expired = now.duration_since(at) >= IDEMPOTENCY_TTL;
            if !(expired || self.bytes > IDEMPOTENCY_BUDGET) {
                break;
            }
            self.order.pop_front();
            // Only remove the entry this order record was made for (not a newer one).
            if self.slots.get(&key).is_some_and(|(_, t)| *t == at) {
                if let Some((Slot::Done { answer, .. }, _)) = self.slots.remove(&key) {
                    self.bytes -= answer.body.len();
                }
            }
        }
    }
}

enum Claim {
    Run,
    Replay(Stored),
    Mismatch,
    Busy,
}

impl IdempotencyCache {
    fn claim(&self, key: [u8; 32], fingerprint: [u8; 32], now: Instant) -> Claim {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.evict(now);
        match g.slots.get(&key) {
            Some((Slot::Running { fingerprint: f }, _)) if *f == fingerprint => Claim::Busy,
            Some((
                Slot::Done {
                    fingerprint: f,
                    answer,
                },
                _,
            )) if *f == fingerprint => Claim::Replay(answer.clone()),
            Some(_) => Claim::Mismatch,
            None => {
                g.slots.insert(key, (Slot::Running { fingerprint }, now));
                Claim::Run
            }
        }
    }

    fn finish(&self, key: [u8; 32], fingerprint: [u8; 32], answer: Option<Stored>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match answer {
            None => {
                g.slots.remove(&key);
            }
            Some(answer) => {
                g.bytes += answer.body.len();
                g.slots.insert(
                    key,
                    (
                        Slot::Done {
                            fingerprint,
                            answer,
                        },
                        now,
                    ),
                );
                g.order.push_back((key, now));
                g.evict(now);
            }
        }
    }
}

/// Whether an answer with this status is kept for replay: successes and refusals that do not
/// depend on the token's rights or on load.
fn replayable(status: StatusCode) -> bool {
    status.is_success()
        || (status.is_client_error()
            && !matches!(
                status,
                StatusCode::UNAUTHORIZED
                    | StatusCode::FORBIDDEN
                    | StatusCode::REQUEST_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS
            ))
}

pub(super) async fn idempotency(State(c): Ctl, req: Request<Body>, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let Some(key) = req.headers().get(IDEMPOTENCY_KEY).cloned() else {
        return next.run(req).await;
    };
    if key.is_empty()
        || key.len() > IDEMPOTENCY_KEY_MAX
        || !key.as_bytes().iter().all(|b| (0x21..0x7f).contains(b))
    {
        return ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"),
        )
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return ApiFailure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request bodies are limited to {MAX_BODY} bytes"),
            )
            .into_response()
        }
    };
    // The key is scoped to the caller (its token), the method and the path.
    let mut h = Sha256::new();
    for part in [
        parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or(b""),
        parts.method.as_str().as_bytes(),
        parts.uri.path().as_bytes(),
        key.as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let slot: [u8; 32] = h.finalize().into();
    let fingerprint: [u8; 32] = Sha256::digest(&bytes).into();
    match c.idempotency.claim(slot, fingerprint, Instant::now()) {
        Claim::Run => {}
        Claim::Replay(a) => {
            let mut resp = (a.status, a.body).into_response();
            if let Some(ct) = a.content_type {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            if let Some(etag) = a.etag {
                resp.headers_mut().insert(header::ETAG, etag);
            }
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return resp;
        }
        Claim::Mismatch => {
            return ApiFailure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                format!(
                    "Idempotency-Key {:?} was already used for a different request",
                    String::from_utf8_lossy(key.as_bytes())
                ),
            )
            .into_response()
        }
        Claim::Busy => {
            return ApiFailure::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still running; retry",
            )
            .into_response()
        }
    }
    // A client that hangs up drops this future: the guard frees the key for its retry.
    let guard = RunGuard {
        control: c.clone(),
        slot,
        armed: true,
    };
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    guard.disarm();
    if !replayable(resp.status()) {
        c.idempotency.finish(slot, fingerprint, None);
        return resp;
    }
    let (rparts, rbody) = resp.into_parts();
    match axum::body::to_bytes(rbody, IDEMPOTENCY_MAX_ANSWER).await {
        Ok(body) => {
            let answer = Stored {
                status: rparts.status,
                content_type: rparts.headers.get(header::CONTENT_TYPE).cloned(),
                etag: rparts.headers.get(header::ETAG).cloned(),
                body: body.clone(),
            };
            c.idempotency.finish(slot, fingerprint, Some(answer));
            Response::from_parts(rparts, Body::from(body))
        }
        Err(_) => {
            c.idempotency.finish(slot, fingerprint, None);
            ApiFailure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the answer was too large to keep for Idempotency-Key replays",
            )
            .into_response()
        }
    }
}

struct RunGuard {
    control: Arc<Control>,
    slot: [u8; 32],
    armed: bool,
}

impl RunGuard {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if self.armed {
            let mut g = self
                .control
                .idempotency
                .inner
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if matches!(g.slots.get(&self.slot), Some((Slot::Running { .. }, _))) {
                g.slots.remove(&self.slot);
            }
        }
    }
}

/// Routes whose mutations are not audited per request (agent telemetry; see event-types.md).
const NOT_AUDITED: &[&str] = &[
    "/v1/hosts/{host}/logs",
    "/v1/hosts/{host}/instances/{instance}/report",
];

pub(super) async fn audit(State(c): Ctl, req: Request<Body>, next: Next) -> Response {
    let mutating = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let Some(route) = route.filter(|r| mutating && !NOT_AUDITED.contains(&r.as_str())) else {
        return next.run(req).await;
    };
    let (mut parts, body) = req.into_parts();
    // Authenticate once here; the handler's `Principal` extractor reuses the result.
    let principal = Principal::from_request_parts(&mut parts, &c).await.ok();
    if let Some(p) = &principal {
        parts.extensions.insert(p.clone());
    }
    let action = format!("{} {route}", parts.method);
    let target = parts.uri.path().to_owned();
    let request_id = parts
        .headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resp = next.run(Request::from_parts(parts, body)).await;
    let Some(p) = principal else {
        return resp;
    };
    let status = resp.status();
    let outcome = if status.is_success() {
        "succeeded"
    } else if status.is_client_error() {
        "refused"
    } else {
        "failed"
    };
    // Handlers' problems carry their code; axum's own rejections become problems only further
    // out, with the code `problems` gives them.
    let code = match resp.extensions().get::<ProblemCode>() {
        Some(c) => Some(c.0.to_owned()),
        None if status.is_client_error() || status.is_server_error() => {
            Some(rejection_code(status).to_owned())
        }
        None => None,
    };
    let event = Event::AuditRecorded {
        org_id: p.org_id.clone(),
        actor: p.actor(),
        action,
        target,
        outcome: outcome.to_owned(),
        status: status.as_u16(),
        code,
    };
    let res = c
        .store
        .append(Append {
            events: vec![NewEvent::any(event)],
            metadata: Metadata {
                actor: p.actor(),
                request_id,
                ..Default::default()
            },
            idempotency: None,
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %crate::error::error_chain(&e), "cannot record the audit event");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refills() {
        let rl = RateLimiter::new(RateLimit {
            per_second: 10.0,
            burst: 3,
            max_callers: 2,
        });
        let t0 = Instant::now();
        let k = [1u8; 16];
        for _ in 0..3 {
            assert!(rl.check(k, t0).is_ok());
        }
        let wait = rl.check(k, t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && !wait.is_zero(),
            "{wait:?}"
        );
        assert!(rl.check(k, t0 + Duration::from_millis(100)).is_ok());
        // Other callers have their own bucket; beyond max_callers busy ones, new ones wait.
        assert!(rl.check([2u8; 16], t0).is_ok());
        assert!(rl.check([3u8; 16], t0).is_err());
        // Once the others refilled, they are forgotten and the newcomer gets a bucket.
        assert!(rl.check([3u8; 16], t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn idempotency_replays_refuses_and_forgets() {
        let c = IdempotencyCache::default();
        let now = Instant::now();
        let (k, f, g) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        assert!(matches!(c.claim(k, f, now), Claim::Run));
        assert!(matches!(c.claim(k, f, now), Claim::Busy));
        assert!(matches!(c.claim(k, g, now), Claim::Mismatch));
        let answer = Stored {
            status: StatusCode::CREATED,
            content_type: None,
            etag: None,
            body: Bytes::from_static(b"{}"),
        };
        c.finish(k, f, Some(answer));
        assert!(matches!(c.claim(k, f, now), Claim::Replay(a) if a.status == StatusCode::CREATED));
        assert!(matches!(c.claim(k, g, now), Claim::Mismatch));
        assert!(matches!(
            c.claim(k, f, now + IDEMPOTENCY_TTL + Duration::from_secs(1)),
            Claim::Run
        ));
        // A failed run leaves no trace: the retry runs.
        c.finish(k, f, None);
        assert!(matches!(c.claim(k, g, now), Claim::Run));
    }
}
