//! What every endpoint shares: problems for every error (axum's own rejections too), request
//! ids, body limits, cursor pagination, Idempotency-Key replays, If-Match, rate limits, the audit
//! trail and the event stream. A real store and the real router on 127.0.0.1:0.

mod common;

use std::time::Duration;

use common::{unlimited, Cluster};
use kiln_control::{RateLimit, Scope};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn call(
    c: &Cluster,
    token: &str,
    method: Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut rb = reqwest::Client::new()
        .request(method, c.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, value)
}

fn assert_problem(got: &(StatusCode, reqwest::header::HeaderMap, Value), status: u16, code: &str) {
    let (s, h, v) = got;
    assert_eq!(s.as_u16(), status, "{v}");
    assert_eq!(
        h.get("content-type").unwrap(),
        "application/problem+json",
        "{v}"
    );
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["status"], status);
    let rid = h.get("x-request-id").unwrap().to_str().unwrap();
    assert_eq!(v["request_id"], rid, "the problem names the request id");
}

#[tokio::test]
async fn malformed_requests_are_problems() {
    let c = Cluster::start(unlimited()).await;
    let t = c.a.token(Scope::Admin);
    let bad_json = call(&c, t, Method::POST, "/v1/apps", Some("{\"name\":"), &[]).await;
    assert_problem(&bad_json, 400, "bad_request");
    let wrong_type = call(&c, t, Method::POST, "/v1/apps", Some("{\"name\": 3}"), &[]).await;
    assert_problem(&wrong_type, 422, "invalid_body");
    let bad_name = call(
        &c,
        t,
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"Not A Label\"}"),
        &[],
    )
    .await;
    assert_problem(&bad_name, 422, "invalid_body");
    let no_type = reqwest::Client::new()
        .post(c.url("/v1/apps"))
        .bearer_auth(t)
        .body("{\"name\": \"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(no_type.status(), 415);
    let huge = format!("{{\"name\": \"{}\"}}", "a".repeat(3 * 1024 * 1024));
    assert_problem(
        &call(&c, t, Method::POST, "/v1/apps", Some(&huge), &[]).await,
        413,
        "body_too_large",
    );
    assert_problem(
        &call(&c, t, Method::GET, "/v1/nope", None, &[]).await,
        404,
        "no_route",
    );
    assert_problem(
        &call(&c, t, Method::DELETE, "/v1/apps", None, &[]).await,
        405,
        "method_not_allowed",
    );
    assert_problem(
        &call(
            &c,
            t,
            Method::GET,
            "/v1/apps/alpha/releases/notanumber",
            None,
            &[],
        )
        .await,
        400,
        "bad_request",
    );
    assert_problem(
        &call(&c, "kiln_nope", Method::GET, "/v1/apps", None, &[]).await,
        401,
        "unauthorized",
    );
    assert_problem(
        &call(&c, t, Method::GET, "/v1/apps?limit=0", None, &[]).await,
        400,
        "invalid_limit",
    );
    assert_problem(
        &call(&c, t, Method::GET, "/v1/apps?cursor=zz", None, &[]).await,
        400,
        "invalid_cursor",
    );
}

#[tokio::test]
async fn request_ids_are_echoed_when_sane() {
    let c = Cluster::start(unlimited()).await;
    let t = c.a.token(Scope::Read);
    let (_, h, _) = call(
        &c,
        t,
        Method::GET,
        "/v1/apps",
        None,
        &[("x-request-id", "abc-123_x")],
    )
    .await;
    assert_eq!(h["x-request-id"], "abc-123_x");
    let (_, h, _) = call(
        &c,
        t,
        Method::GET,
        "/v1/apps",
        None,
        &[("x-request-id", "no spaces!")],
    )
    .await;
    let id = h["x-request-id"].to_str().unwrap();
    assert!(id.starts_with("req_") && id.len() > 8, "{id}");
}

#[tokio::test]
async fn lists_page_with_an_opaque_cursor() {
    let c = Cluster::start(unlimited()).await;
    let t = c.a.token(Scope::Admin);
    for n in ["c1", "c2", "c3", "c4"] {
        let (s, _, v) = call(
            &c,
            t,
            Method::POST,
            "/v1/apps",
            Some(&json!({"name": n}).to_string()),
            &[],
        )
        .await;
        assert_eq!(s, 201, "{v}");
    }
    let mut names = Vec::new();
    let mut path = "/v1/apps?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let (s, _, v) = call(&c, t, Method::GET, &path, None, &[]).await;
        assert_eq!(s, 200, "{v}");
        pages += 1;
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        names.extend(items.iter().map(|a| a["name"].as_str().unwrap().to_owned()));
        match v["next_cursor"].as_str() {
            Some(cur) => path = format!("/v1/apps?limit=2&cursor={cur}"),
            None => break,
        }
    }
    assert_eq!(names, ["alpha", "c1", "c2", "c3", "c4"]);
    assert_eq!(pages, 3);
    // A cursor of one list is refused by another.
    let (_, _, v) = call(&c, t, Method::GET, "/v1/apps?limit=1", None, &[]).await;
    let cur = v["next_cursor"].as_str().unwrap();
    let other = call(
        &c,
        t,
        Method::GET,
        &format!("/v1/apps/alpha/releases?cursor={cur}"),
        None,
        &[],
    )
    .await;
    assert_problem(&other, 400, "invalid_cursor");
    // Instances and releases list for real.
    let (s, _, v) = call(&c, t, Method::GET, "/v1/apps/alpha/instances", None, &[]).await;
    assert_eq!(s, 200);
    assert_eq!(v["items"][0]["id"], c.a.instance.as_ref().unwrap().as_str());
    let (_, _, v) = call(&c, t, Method::GET, "/v1/apps/alpha/releases", None, &[]).await;
    assert_eq!(v["items"][0]["version"], 1);
}

#[tokio::test]
async fn idempotency_keys_replay_and_refuse_other_bodies() {
    let c = Cluster::start(unlimited()).await;
    let t = c.a.token(Scope::Deploy);
    let key = [("idempotency-key", "k-1")];
    let first = call(
        &c,
        t,
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"idem\"}"),
        &key,
    )
    .await;
    assert_eq!(first.0, 201, "{}", first.2);
    let again = call(
        &c,
        t,
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"idem\"}"),
        &key,
    )
    .await;
    assert_eq!(
        again.0, 201,
        "a retry gets the first answer, not 409 app_exists"
    );
    assert_eq!(again.2, first.2);
    assert_eq!(again.1["idempotent-replayed"], "true");
    let other = call(
        &c,
        t,
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"idem2\"}"),
        &key,
    )
    .await;
    assert_problem(&other, 422, "idempotency_key_reused");
    // Without the key, the same request is a new one.
    let fresh = call(
        &c,
        t,
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"idem\"}"),
        &[],
    )
    .await;
    assert_problem(&fresh, 409, "app_exists");
    // Keys are per token: another token's same key is a new request.
    let t2 = c.a.token(Scope::Admin);
    let other_token = call(
        &c,
        t2,
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"idem2\"}"),
        &key,
    )
    .await;
    assert_eq!(other_token.0, 201);
    let bad_key = call(
        &c,
        t,
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"x1\"}"),
        &[("idempotency-key", "")],
    )
    .await;
    assert_problem(&bad_key, 400, "invalid_idempotency_key");
}

#[tokio::test]
async fn if_match_guards_new_releases() {
    let c = Cluster::start(unlimited()).await;
    let t = c.a.token(Scope::Admin);
    let (s, h, v) = call(&c, t, Method::GET, "/v1/apps/alpha", None, &[]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["etag"], "\"1\"");
    let body =
        json!({"manifest": common::manifest("alpha"), "image": "127.0.0.1:1/x:v1"}).to_string();
    let stale = call(
        &c,
        t,
        Method::POST,
        "/v1/apps/alpha/releases",
        Some(&body),
        &[("if-match", "\"0\"")],
    )
    .await;
    assert_problem(&stale, 412, "precondition_failed");
}

#[tokio::test]
async fn tokens_are_rate_limited_with_retry_after() {
    let c = Cluster::start(RateLimit {
        per_second: 0.5,
        burst: 3,
        max_callers: 100,
    })
    .await;
    let t = c.a.token(Scope::Read);
    for _ in 0..3 {
        assert_eq!(call(&c, t, Method::GET, "/v1/apps", None, &[]).await.0, 200);
    }
    let limited = call(&c, t, Method::GET, "/v1/apps", None, &[]).await;
    assert_problem(&limited, 429, "rate_limited");
    let wait: u64 = limited.1["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    // Another token has its own bucket; health checks are never limited.
    assert_eq!(
        call(
            &c,
            c.b.token(Scope::Read),
            Method::GET,
            "/v1/apps",
            None,
            &[]
        )
        .await
        .0,
        200
    );
    for _ in 0..5 {
        assert_eq!(
            call(&c, "", Method::GET, "/v1/healthz", None, &[]).await.0,
            200
        );
    }
}

#[tokio::test]
async fn mutations_are_audited_and_events_follow() {
    let c = Cluster::start(unlimited()).await;
    let t = c.a.token(Scope::Admin);
    // Follow from now on.
    let (_, _, page) = call(&c, t, Method::GET, "/v1/events?limit=500", None, &[]).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let mut follow = reqwest::Client::new()
        .get(c.url(&format!("/v1/events?follow=true&cursor={cursor}")))
        .bearer_auth(t)
        .send()
        .await
        .unwrap();
    assert_eq!(follow.headers()["content-type"], "application/x-ndjson");

    let ok = call(
        &c,
        t,
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"audited\"}"),
        &[("x-request-id", "rq-1")],
    )
    .await;
    assert_eq!(ok.0, 201);
    let refused = call(
        &c,
        t,
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"audited\"}"),
        &[],
    )
    .await;
    assert_eq!(refused.0, 409);
    let denied = call(
        &c,
        c.a.token(Scope::Read),
        Method::POST,
        "/v1/apps",
        Some("{\"name\": \"nope\"}"),
        &[],
    )
    .await;
    assert_eq!(denied.0, 403);
    let malformed = call(&c, t, Method::POST, "/v1/apps", Some("{\"name\": 7}"), &[]).await;
    assert_eq!(malformed.0, 422);

    let mut lines = Vec::new();
    let mut buf = Vec::new();
    while lines.len() < 5 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), follow.chunk())
            .await
            .expect("the follower got the events")
            .unwrap()
            .unwrap();
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if line.len() > 1 {
                let v = serde_json::from_slice::<Value>(&line).unwrap();
                // A token's last use is recorded in the background (at most once a minute):
                // not part of what this test orders.
                if v["type"] != "token_used" {
                    lines.push(v);
                }
            }
        }
    }
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "app_created",
            "audit_recorded",
            "audit_recorded",
            "audit_recorded",
            "audit_recorded"
        ]
    );
    let outcomes: Vec<(&str, u64, &str)> = lines[1..]
        .iter()
        .map(|l| {
            (
                l["data"]["outcome"].as_str().unwrap(),
                l["data"]["status"].as_u64().unwrap(),
                l["data"]["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("succeeded", 201, ""),
            ("refused", 409, "app_exists"),
            ("refused", 403, "insufficient_scope"),
            ("refused", 422, "invalid_body")
        ]
    );
    assert_eq!(lines[1]["data"]["action"], "POST /v1/apps");
    assert_eq!(lines[1]["request_id"], "rq-1");
    assert!(lines[1]["actor"]
        .as_str()
        .unwrap()
        .starts_with("token:tok_"));
    // Token hashes never leave the control plane.
    let (_, _, all) = call(&c, t, Method::GET, "/v1/events?limit=500", None, &[]).await;
    let created: Vec<&Value> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "token_created")
        .collect();
    assert!(!created.is_empty());
    assert!(created.iter().all(|e| e["data"].get("hash").is_none()));
}

fn assert_problem_status(s: StatusCode, v: &Value, status: u16, code: &str) {
    assert_eq!(
        (s.as_u16(), v["code"].as_str()),
        (status, Some(code)),
        "{v}"
    );
}

#[tokio::test]
async fn host_registrations_with_extreme_values_keep_the_hosts_view_readable() {
    let c = Cluster::start(unlimited()).await;
    let t = c.operator.token(Scope::Admin);
    for body in [
        json!({"name": "big", "driver": "runc", "cpu": u32::MAX, "memory": u64::MAX}),
        json!({"name": "", "driver": "runc", "cpu": 0, "memory": 0}),
    ] {
        let (s, _, v) = call(
            &c,
            t,
            Method::POST,
            "/v1/hosts",
            Some(&body.to_string()),
            &[],
        )
        .await;
        assert_problem_status(s, &v, 422, "invalid_host");
        let (s, _, v) = call(&c, t, Method::GET, "/v1/hosts", None, &[]).await;
        assert_eq!(s, 200, "after {body}: {v}");
    }
}
