//! Login with the OAuth 2.0 device authorization grant (RFC 8628), and its verification page.
//!
//! 1. The CLI posts `client_id` (and optionally `org`) to `POST /v1/device/code` and gets a
//!    `device_code` (a secret only the CLI knows), a short `user_code` (`WDJB-MJHT`), the
//!    `verification_uri` of this page, `expires_in` and the polling `interval`.
//! 2. The user opens `GET /v1/device`, a plain HTML form (no script) carrying a CSRF token that
//!    must equal the page's `kiln_csrf` cookie (double submit; `SameSite=Strict`), and submits the
//!    user code (case and dashes ignored), email and password with approve or deny.
//! 3. The CLI polls `POST /v1/device/token`; the answer is `authorization_pending` until then,
//!    `slow_down` (interval + 5 s, kept for every later poll) when it polls faster than the
//!    interval, `access_denied` after a deny or too many wrong passwords, `expired_token` after
//!    `expires_in`, and the access token once approved: a new user token with the scopes of the
//!    user's role in the org, expiring after `login_token_ttl`.
//!
//! Pending authorizations live in this process's memory (they last minutes and are worth nothing
//! after a restart: the CLI starts over); with several replicas, the device endpoints need
//! sticky routing. Attempts are bounded: 5 wrong passwords end an authorization, 10 failures per
//! email per 15 minutes lock that email out of this page, unknown user codes are limited to 30 a
//! minute for the whole process, and at most 4 password checks run at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::FormRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use sha2::{Digest, Sha256};

use kiln_api::{
    DeviceAccessToken, DeviceApproval, DeviceAuthorization, DeviceCodeRequest, DevicePageQuery,
    DeviceTokenRequest, OAuthError, DEVICE_CODE_GRANT,
};
use kiln_store::{Append, Metadata, NewEvent};
use kiln_types::event::Role;
use kiln_types::{OrgId, UserId};

use crate::auth::{new_token, NewToken};
use crate::error::ApiFailure;
use crate::users::{dummy_hash, normalize_email, role_scopes, verify_password};
use crate::Control;

type Ctl = State<Arc<Control>>;

/// RFC 8628 section 6.1: base-20 letters without vowels (no words, no 0/O or 1/I confusion).
const USER_CODE_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
const USER_CODE_LEN: usize = 8;
/// Most authorizations pending at once; more are refused (429) rather than grow memory.
const MAX_PENDING: usize = 10_000;
/// Wrong passwords that end one authorization.
const MAX_FAILURES_PER_CODE: u32 = 5;
/// Failed sign-ins per email per window.
const MAX_FAILURES_PER_EMAIL: u32 = 10;
const EMAIL_WINDOW_MS: i64 = 15 * 60 * 1000;
/// Unknown or expired user codes per minute, for the whole process.
const MAX_BAD_CODES_PER_MINUTE: u32 = 30;
/// A poll this much earlier than the interval still counts as on time (network jitter).
const POLL_TOLERANCE_MS: i64 = 250;
/// RFC 8628 section 3.5: each `slow_down` adds 5 seconds to the interval.
const SLOW_DOWN_STEP_SECS: u64 = 5;
const CSRF_COOKIE: &str = "kiln_csrf";
const TOKEN_NAME: &str = "kiln login";

#[derive(Debug, Clone)]
enum Status {
    Pending,
    Approved {
        user_id: UserId,
        org_id: OrgId,
        role: Role,
    },
    Denied,
}

#[derive(Debug)]
struct Pending {
    user_code: String,
    org: Option<String>,
    expires_at: i64,
    interval_secs: u64,
    last_poll: Option<i64>,
    status: Status,
    failures: u32,
}

#[derive(Debug, Default)]
struct FlowState {
    /// By SHA-256 of the device code: the secret itself is not kept.
    by_device: HashMap<String, Pending>,
    /// Normalized user code → device key.
    by_user_code: HashMap<String, String>,
    /// (window start, count) per email.
    email_failures: HashMap<String, (i64, u32)>,
    /// (minute start, count) of unknown user codes.
    bad_codes: (i64, u32),
}

/// Password checks (argon2, about 19 MiB and tens of ms each) running at once; more are refused
/// with 429 rather than let sign-in attempts take the machine's memory and CPU.
const MAX_CONCURRENT_CHECKS: usize = 4;
/// Emails tracked for failed sign-ins; past this, entries outside the window are dropped, then all.
const MAX_TRACKED_EMAILS: usize = 50_000;

/// The device authorizations of this process.
#[derive(Debug)]
pub(crate) struct DeviceFlows {
    state: Mutex<FlowState>,
    checks: tokio::sync::Semaphore,
}

impl Default for DeviceFlows {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            checks: tokio::sync::Semaphore::new(MAX_CONCURRENT_CHECKS),
        }
    }
}

impl DeviceFlows {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FlowState {
    /// Drops authorizations expired for longer than `grace_ms` (an expired one is kept a while
    /// so its poller hears `expired_token` rather than `invalid_grant`).
    fn prune(&mut self, now: i64, grace_ms: i64) {
        let by_user_code = &mut self.by_user_code;
        self.by_device.retain(|_, p| {
            let keep = now < p.expires_at + grace_ms;
            if !keep {
                by_user_code.remove(&p.user_code);
            }
            keep
        });
        self.email_failures
            .retain(|_, (start, _)| now - *start < EMAIL_WINDOW_MS);
    }

    fn remove(&mut self, key: &str) {
        if let Some(p) = self.by_device.remove(key) {
            self.by_user_code.remove(&p.user_code);
        }
    }
}

fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut raw = vec![0u8; len];
    getrandom::fill(&mut raw).expect("operating system random source");
    raw.iter()
        .map(|b| alphabet[(*b as usize) % alphabet.len()] as char)
        .collect()
}

fn key_of(device_code: &str) -> String {
    hex::encode(Sha256::digest(device_code.as_bytes()))
}

/// `wdjb-mjht`, `WDJB MJHT`, `wdjbmjht` → `WDJBMJHT`; `None` when it cannot be a user code.
pub(crate) fn normalize_user_code(input: &str) -> Option<String> {
    if input.len() > 64 {
        return None;
    }
    let code: String = input
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '\t'))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == USER_CODE_LEN && code.bytes().all(|b| USER_CODE_ALPHABET.contains(&b)))
        .then_some(code)
}

fn display_user_code(code: &str) -> String {
    format!("{}-{}", &code[..4], &code[4..])
}

/// Where users reach this control plane: the configured URL, else `http://` + `Host`.
fn base_url(c: &Control, headers: &HeaderMap) -> String {
    if let Some(u) = &c.config.public_url {
        return u.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("http://{host}")
}

fn secs(d: std::time::Duration) -> u64 {
    d.as_secs().max(1)
}

#[utoipa::path(post, path = "/v1/device/code", tag = "auth",
    request_body(content = kiln_api::DeviceCodeRequest, content_type = "application/x-www-form-urlencoded"),
    security(()),
    responses((status = 200, description = "RFC 8628 device authorization.", body = kiln_api::DeviceAuthorization),
        (status = 400, description = "OAuth error.", body = kiln_api::OAuthError)))]
pub(crate) async fn device_code(
    State(c): Ctl,
    headers: HeaderMap,
    form: Result<Form<DeviceCodeRequest>, FormRejection>,
) -> Response {
    let Ok(Form(req)) = form else {
        return oauth_error("invalid_request", "expected a form with client_id", None);
    };
    if req.client_id.is_empty() || req.client_id.len() > 100 {
        return oauth_error("invalid_client", "client_id is required", None);
    }
    let org = req
        .org
        .filter(|o| !o.is_empty() && o.len() <= 100)
        .map(|o| o.trim().to_owned());
    let now = c.config.clock.now_millis();
    let ttl_ms = c.config.device_code_ttl.as_millis() as i64;
    let device_code = format!(
        "kdc_{}",
        random_string(b"abcdefghijklmnopqrstuvwxyz234567", 32)
    );
    let interval = secs(c.config.device_poll_interval);
    let user_code = {
        let mut st = c.device.lock();
        st.prune(now, ttl_ms);
        if st.by_device.len() >= MAX_PENDING {
            drop(st);
            return ApiFailure::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_logins",
                "too many logins are pending; retry in a minute",
            )
            .into_response();
        }
        // Collisions are unlikely (20^8 codes); draw again if one happens.
        let user_code = loop {
            let code = random_string(USER_CODE_ALPHABET, USER_CODE_LEN);
            if !st.by_user_code.contains_key(&code) {
                break code;
            }
        };
        let key = key_of(&device_code);
        st.by_user_code.insert(user_code.clone(), key.clone());
        st.by_device.insert(
            key,
            Pending {
                user_code: user_code.clone(),
                org,
                expires_at: now + ttl_ms,
                interval_secs: interval,
                last_poll: None,
                status: Status::Pending,
                failures: 0,
            },
        );
        user_code
    };
    let base = base_url(&c, &headers);
    let shown = display_user_code(&user_code);
    tracing::info!(client_id = %req.client_id, "device login started");
    let mut resp = Json(DeviceAuthorization {
        device_code,
        verification_uri: format!("{base}/v1/device"),
        verification_uri_complete: format!("{base}/v1/device?user_code={shown}"),
        user_code: shown,
        expires_in: secs(c.config.device_code_ttl),
        interval,
    })
    .into_response();
    no_store(&mut resp);
    resp
}

fn no_store(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn oauth_error(error: &str, description: &str, interval: Option<u64>) -> Response {
    let mut resp = (
        StatusCode::BAD_REQUEST,
        Json(OAuthError {
            error: error.to_owned(),
            error_description: Some(description.to_owned()),
            interval,
        }),
    )
        .into_response();
    no_store(&mut resp);
    resp
}

#[utoipa::path(post, path = "/v1/device/token", tag = "auth",
    request_body(content = kiln_api::DeviceTokenRequest, content_type = "application/x-www-form-urlencoded"),
    security(()),
    responses((status = 200, description = "The token, once approved.", body = kiln_api::DeviceAccessToken),
        (status = 400, description = "authorization_pending, slow_down, access_denied, expired_token.", body = kiln_api::OAuthError)))]
pub(crate) async fn device_token(
    State(c): Ctl,
    form: Result<Form<DeviceTokenRequest>, FormRejection>,
) -> Response {
    let Ok(Form(req)) = form else {
        return oauth_error(
            "invalid_request",
            "expected a form with grant_type, device_code and client_id",
            None,
        );
    };
    if req.grant_type != DEVICE_CODE_GRANT {
        return oauth_error(
            "unsupported_grant_type",
            "only the device_code grant is supported",
            None,
        );
    }
    let now = c.config.clock.now_millis();
    let key = key_of(&req.device_code);
    let approved = {
        let mut st = c.device.lock();
        let Some(p) = st.by_device.get_mut(&key) else {
            return oauth_error("invalid_grant", "unknown device_code", None);
        };
        if now >= p.expires_at {
            st.remove(&key);
            return oauth_error(
                "expired_token",
                "the code expired; run `kiln login` again",
                None,
            );
        }
        match p.status.clone() {
            Status::Denied => {
                st.remove(&key);
                return oauth_error("access_denied", "the login was denied", None);
            }
            Status::Approved {
                user_id,
                org_id,
                role,
            } => {
                st.remove(&key);
                (user_id, org_id, role)
            }
            Status::Pending => {
                let early = p.last_poll.is_some_and(|last| {
                    now - last < (p.interval_secs as i64) * 1000 - POLL_TOLERANCE_MS
                });
                p.last_poll = Some(now);
                if early {
                    p.interval_secs += SLOW_DOWN_STEP_SECS;
                    let interval = p.interval_secs;
                    return oauth_error(
                        "slow_down",
                        "polling too fast; wait `interval` seconds between polls",
                        Some(interval),
                    );
                }
                return oauth_error(
                    "authorization_pending",
                    "waiting for the user to approve",
                    None,
                );
            }
        }
    };
    let (user_id, org_id, role) = approved;
    let ttl = c.config.login_token_ttl;
    let scopes = role_scopes(role);
    let (secret, event) = new_token(NewToken {
        org: &org_id,
        name: TOKEN_NAME,
        scopes,
        expires_at: Some(now + ttl.as_millis() as i64),
        user_id: Some(user_id.clone()),
        app_id: None,
    });
    let res = c
        .store
        .append(Append {
            events: vec![NewEvent::any(event)],
            metadata: Metadata {
                actor: format!("user:{user_id}"),
                ..Default::default()
            },
            idempotency: None,
        })
        .await;
    if let Err(e) = res {
        return ApiFailure::from(e).into_response();
    }
    tracing::info!(user_id = %user_id, org_id = %org_id, "device login completed");
    let mut resp = Json(DeviceAccessToken {
        access_token: secret,
        token_type: "Bearer".into(),
        expires_in: ttl.as_secs(),
        scope: scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" "),
    })
    .into_response();
    no_store(&mut resp);
    resp
}

// ---- The verification page. ----

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem}\
label{display:block;margin:.8rem 0}input{display:block;width:100%;padding:.4rem;font:inherit;box-sizing:border-box}\
button{margin:.8rem .5rem 0 0;padding:.5rem 1rem;font:inherit}.msg{padding:.6rem;border:1px solid #999}";

fn page(status: StatusCode, title: &str, body: &str, cookie: Option<&str>) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>Kiln: {t}</title><style>{STYLE}</style></head><body><main><h1>{t}</h1>{body}</main></body></html>\n",
        t = escape(title)
    );
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(c).ok()) {
        h.insert(header::SET_COOKIE, v);
    }
    resp
}

fn message(status: StatusCode, title: &str, text: &str) -> Response {
    page(
        status,
        title,
        &format!("<p class=\"msg\">{}</p>", escape(text)),
        None,
    )
}

#[utoipa::path(get, path = "/v1/device", tag = "auth",
    params(("user_code" = Option<String>, Query, description = "Prefills the form")),
    security(()),
    responses((status = 200, description = "The verification page (HTML form).", body = String, content_type = "text/html"),
        (status = 400, description = "A bad user code (HTML).", body = String, content_type = "text/html"),
        (status = 429, description = "Too many attempts (HTML).", body = String, content_type = "text/html")))]
pub(crate) async fn device_page(State(c): Ctl, Query(q): Query<DevicePageQuery>) -> Response {
    let csrf = random_string(b"abcdefghijklmnopqrstuvwxyz234567", 32);
    let secure = c
        .config
        .public_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"));
    let cookie = format!(
        "{CSRF_COOKIE}={csrf}; Path=/v1/device; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    );
    let code = q.user_code.unwrap_or_default();
    let code = code.chars().take(16).collect::<String>();
    let body = format!(
        "<p>Approve a sign-in of the Kiln CLI. Check that the code below is the one your terminal \
shows.</p>\
<form method=\"post\" action=\"/v1/device\">\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<label>Code<input name=\"user_code\" value=\"{code}\" autocomplete=\"off\" autocapitalize=\"characters\" required></label>\
<label>Email<input name=\"email\" type=\"email\" autocomplete=\"username\" required></label>\
<label>Password<input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label>\
<label>Org (optional)<input name=\"org\" autocomplete=\"off\"></label>\
<button name=\"action\" value=\"approve\">Approve</button>\
<button name=\"action\" value=\"deny\" formnovalidate>Deny</button>\
</form>",
        code = escape(&code)
    );
    page(StatusCode::OK, "Sign in a device", &body, Some(&cookie))
}

/// The CSRF cookie's value, if the request carries one.
fn csrf_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == CSRF_COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// Equal-length, constant-time comparison (the CSRF token is a secret of the page).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A browser's `Origin`, when sent, must be this control plane.
fn origin_ok(c: &Control, headers: &HeaderMap) -> bool {
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => {
            let base = base_url(c, headers);
            origin == base
                || c.config.public_url.is_none()
                    && origin == base.replacen("http://", "https://", 1)
        }
    }
}

#[utoipa::path(post, path = "/v1/device", tag = "auth",
    request_body(content = kiln_api::DeviceApproval, content_type = "application/x-www-form-urlencoded"),
    security(()),
    responses((status = 200, description = "The outcome page (HTML).", body = String, content_type = "text/html"),
        (status = 400, description = "An incomplete form (HTML).", body = String, content_type = "text/html"),
        (status = 403, description = "A forged or expired form (HTML).", body = String, content_type = "text/html"),
        (status = 429, description = "Too many attempts (HTML).", body = String, content_type = "text/html")))]
pub(crate) async fn device_submit(
    State(c): Ctl,
    headers: HeaderMap,
    form: Result<Form<DeviceApproval>, FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return message(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "The form was incomplete. Go back and try again.",
        );
    };
    let csrf_ok =
        csrf_cookie(&headers).is_some_and(|cookie| !cookie.is_empty() && same(&cookie, &f.csrf));
    if !csrf_ok || !origin_ok(&c, &headers) {
        return message(
            StatusCode::FORBIDDEN,
            "Sign-in failed",
            "This form is stale or was not sent from this page. Reload the page and try again.",
        );
    }
    let now = c.config.clock.now_millis();
    let code = normalize_user_code(&f.user_code);
    // Find the authorization; count unknown codes against the process-wide limit.
    let found = {
        let mut st = c.device.lock();
        let key = code
            .as_ref()
            .and_then(|code| st.by_user_code.get(code).cloned());
        let live = key.filter(|k| {
            st.by_device
                .get(k)
                .is_some_and(|p| now < p.expires_at && matches!(p.status, Status::Pending))
        });
        if live.is_none() {
            if now - st.bad_codes.0 >= 60_000 {
                st.bad_codes = (now, 0);
            }
            st.bad_codes.1 += 1;
            if st.bad_codes.1 > MAX_BAD_CODES_PER_MINUTE {
                drop(st);
                return message(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many attempts",
                    "Too many unknown codes were tried. Wait a minute and try again.",
                );
            }
        }
        live.map(|k| {
            let org = st.by_device.get(&k).and_then(|p| p.org.clone());
            (k, org)
        })
    };
    let Some((key, requested_org)) = found else {
        return message(
            StatusCode::BAD_REQUEST,
            "Unknown code",
            "That code is unknown, used or expired. Check the code your terminal shows, or run `kiln login` again.",
        );
    };
    if f.action == "deny" {
        if let Some(p) = c.device.lock().by_device.get_mut(&key) {
            p.status = Status::Denied;
        }
        tracing::info!("device login denied");
        return message(
            StatusCode::OK,
            "Sign-in denied",
            "The device was not signed in. You can close this page.",
        );
    }
    if f.action != "approve" {
        return message(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "Choose approve or deny.",
        );
    }
    let email = normalize_email(&f.email).unwrap_or_default();
    {
        let st = c.device.lock();
        if st
            .email_failures
            .get(&email)
            .is_some_and(|(start, n)| now - start < EMAIL_WINDOW_MS && *n >= MAX_FAILURES_PER_EMAIL)
        {
            drop(st);
            return message(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many attempts",
                "Too many failed sign-ins for this email. Wait 15 minutes and try again.",
            );
        }
    }
    let user = match c.store.user_by_email(email.clone()).await {
        Ok(u) => u,
        Err(e) => return ApiFailure::from(e).into_response(),
    };
    let phc = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| dummy_hash().to_owned());
    let Ok(_permit) = c.device.checks.try_acquire() else {
        return message(
            StatusCode::TOO_MANY_REQUESTS,
            "Busy",
            "Too many sign-ins at once. Try again in a moment.",
        );
    };
    let password = f.password;
    let verified = tokio::task::spawn_blocking(move || verify_password(&password, &phc))
        .await
        .unwrap_or(false);
    let user = match user {
        Some(u) if verified => u,
        _ => {
            let mut st = c.device.lock();
            if st.email_failures.len() >= MAX_TRACKED_EMAILS {
                st.email_failures
                    .retain(|_, (start, _)| now - *start < EMAIL_WINDOW_MS);
                if st.email_failures.len() >= MAX_TRACKED_EMAILS {
                    st.email_failures.clear();
                }
            }
            let entry = st.email_failures.entry(email).or_insert((now, 0));
            if now - entry.0 >= EMAIL_WINDOW_MS {
                *entry = (now, 0);
            }
            entry.1 += 1;
            let mut ended = false;
            if let Some(p) = st.by_device.get_mut(&key) {
                p.failures += 1;
                if p.failures >= MAX_FAILURES_PER_CODE {
                    p.status = Status::Denied;
                    ended = true;
                }
            }
            drop(st);
            tracing::info!(ended, "device login: wrong email or password");
            return message(
                StatusCode::UNAUTHORIZED,
                "Sign-in failed",
                if ended {
                    "Wrong email or password, too many times: this login is cancelled. Run `kiln login` again."
                } else {
                    "Wrong email or password. Go back and try again."
                },
            );
        }
    };
    let memberships = match c.store.memberships_of_user(user.id.clone()).await {
        Ok(m) => m,
        Err(e) => return ApiFailure::from(e).into_response(),
    };
    let wanted = Some(f.org.trim().to_owned())
        .filter(|o| !o.is_empty())
        .or(requested_org);
    let membership = match &wanted {
        Some(org) => memberships.into_iter().find(|m| &m.org_name == org),
        None => memberships.into_iter().next(),
    };
    let Some(m) = membership else {
        return message(
            StatusCode::FORBIDDEN,
            "Sign-in failed",
            &match wanted {
                Some(org) => format!("You are not a member of the org {org:?}."),
                None => "You are not a member of any org yet; ask an admin to add you.".to_owned(),
            },
        );
    };
    {
        let mut st = c.device.lock();
        match st.by_device.get_mut(&key) {
            Some(p) if matches!(p.status, Status::Pending) && now < p.expires_at => {
                p.status = Status::Approved {
                    user_id: user.id.clone(),
                    org_id: m.org_id.clone(),
                    role: m.role,
                };
            }
            _ => {
                drop(st);
                return message(
                    StatusCode::BAD_REQUEST,
                    "Unknown code",
                    "That code expired meanwhile. Run `kiln login` again.",
                );
            }
        }
    }
    tracing::info!(user_id = %user.id, org_id = %m.org_id, "device login approved");
    message(
        StatusCode::OK,
        "Device signed in",
        &format!(
            "Signed in to the org {} as {} ({}). Return to your terminal.",
            m.org_name,
            user.email,
            m.role.as_str()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_are_case_and_dash_insensitive() {
        assert_eq!(
            normalize_user_code("wdjb-mjht").as_deref(),
            Some("WDJBMJHT")
        );
        assert_eq!(
            normalize_user_code(" WDJB MJHT").as_deref(),
            Some("WDJBMJHT")
        );
        for bad in ["", "WDJB-MJH", "WDJB-MJHTX", "AEIO-UUUU", &"B".repeat(100)] {
            assert!(normalize_user_code(bad).is_none(), "{bad}");
        }
        let code = random_string(USER_CODE_ALPHABET, USER_CODE_LEN);
        assert_eq!(
            normalize_user_code(&display_user_code(&code).to_lowercase()),
            Some(code)
        );
    }

    #[test]
    fn html_is_escaped_and_csrf_compares_exactly() {
        assert_eq!(
            escape("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; kiln_csrf=xyz; b=2"),
        );
        assert_eq!(csrf_cookie(&h).as_deref(), Some("xyz"));
    }
}
