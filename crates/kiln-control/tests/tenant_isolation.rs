//! Tenant isolation, walked over every operation of the OpenAPI document the code generates (so a
//! new route is walked without touching this file):
//!
//! 1. With a token of another org (admin, so scopes never hide a leak), a resource of org A
//!    answers exactly like a missing one (same status, same problem code), and no answer carries
//!    org A's ids that the request did not name.
//! 2. With each scope the operation does not accept, the answer is 403 `insufficient_scope`.
//! 3. With the right scope, org A's own resources are found (not 404): the walk above compared
//!    real resources, not two misses.

mod common;

use common::{unlimited, Cluster, Tenant};
use kiln_control::Scope;
use reqwest::Method;
use serde_json::{json, Value};

struct Answer {
    status: u16,
    code: Option<String>,
    text: String,
}

fn scope_of(name: &str) -> Scope {
    match name {
        "read" => Scope::Read,
        "deploy" => Scope::Deploy,
        "exec" => Scope::Exec,
        "host" => Scope::Host,
        "edge" => Scope::Edge,
        "admin" => Scope::Admin,
        "secrets:write" => Scope::SecretsWrite,
        "secrets:read" => Scope::SecretsRead,
        other => panic!("unknown scope {other:?} in the OpenAPI document"),
    }
}

/// `template` with its `{params}` filled by `value`.
fn fill(template: &str, value: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let j = rest[i..].find('}').unwrap() + i;
        out.push_str(&value(&rest[i + 1..j]));
        rest = &rest[j + 1..];
    }
    out.push_str(rest);
    out
}

fn own_ids(c: &Cluster, t: &Tenant) -> impl Fn(&str) -> String {
    let app = t.app.clone();
    let token = t.admin_token_id.clone();
    let instance = t.instance.clone().unwrap().to_string();
    let host = c.host.to_string();
    let org = t.org.to_string();
    move |p: &str| match p {
        "org" => org.clone(),
        "app" => app.clone(),
        "version" => "1".into(),
        "instance" => instance.clone(),
        "host" => host.clone(),
        "session" => "exs_none".into(),
        "id" => token.clone(),
        "address" => "203.0.113.9".into(),
        "hostname" => common::A_DOMAIN.into(),
        other => panic!(
            "path parameter {{{other}}}: teach tenant_isolation.rs a real and a missing value"
        ),
    }
}

fn missing_ids(p: &str) -> String {
    match p {
        "app" => "ghost".into(),
        "version" => "99".into(),
        "instance" => kiln_types::InstanceId::generate().to_string(),
        "host" => kiln_types::HostId::generate().to_string(),
        "session" => "exs_ghost".into(),
        "id" => kiln_types::TokenId::generate().to_string(),
        "address" => "203.0.113.9".into(),
        "org" => kiln_types::OrgId::generate().to_string(),
        "hostname" => common::A_DOMAIN.into(),
        other => panic!("path parameter {{{other}}}: teach tenant_isolation.rs a missing value"),
    }
}

/// A valid body for each request schema, so the walk reaches the handler's checks.
fn sample_body(op: &Value, n: usize) -> Option<String> {
    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
    if schema.is_null() {
        return None;
    }
    let name = schema["$ref"]
        .as_str()
        .map(|r| r.rsplit('/').next().unwrap().to_owned())
        .or_else(|| {
            schema["items"]["$ref"]
                .as_str()
                .map(|r| format!("[{}]", r.rsplit('/').next().unwrap()))
        })
        .unwrap_or_default();
    let body = match name.as_str() {
        "CreateApp" => json!({"name": format!("walk{n}")}),
        "CreateRelease" => {
            json!({"manifest": common::manifest("alpha"), "image": "127.0.0.1:1/x:v1"})
        }
        "RegisterHost" => {
            json!({"name": format!("walk{n}"), "driver": "runc", "cpu": 1000, "memory": 1024})
        }
        "InstanceReport" => json!({"state": "healthy"}),
        "[LogRecord]" => json!([]),
        "AllocateIp" => json!({"kind": "v4"}),
        "Rollback" => json!({"version": 1}),
        "ScaleRequest" => json!({"count": 1}),
        "CreateToken" => json!({"name": format!("walk{n}")}),
        "SetSecrets" => json!({"secrets": {"WALK": "x"}}),
        "UnsetSecrets" => json!({"names": ["WALK"]}),
        "QuotaOverrides" => json!({"apps": 50}),
        "AddDomain" => json!({"hostname": format!("walk{n}.alpha.example")}),
        other => panic!("request body {other:?}: add a valid sample to tenant_isolation.rs"),
    };
    Some(body.to_string())
}

async fn call(c: &Cluster, token: &str, method: &str, path: &str, op: &Value, n: usize) -> Answer {
    let method: Method = method.to_uppercase().parse().unwrap();
    let mut rb = reqwest::Client::new()
        .request(method, c.url(path))
        .bearer_auth(token);
    if let Some(body) = sample_body(op, n) {
        rb = rb.header("content-type", "application/json").body(body);
    }
    if op["responses"].get("101").is_some() {
        rb = rb
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    if status == 101 {
        return Answer {
            status,
            code: None,
            text: String::new(),
        };
    }
    let text = resp.text().await.unwrap();
    let code = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned));
    Answer { status, code, text }
}

#[tokio::test]
async fn every_operation_keeps_tenants_apart() {
    let c = Cluster::start(unlimited()).await;
    let doc = kiln_control::openapi_document();
    // What org A owns that org B must never see (unless B's request named it itself). Not the
    // app's name: names are platform-wide (they are hostnames), and B's own audit trail repeats
    // the paths B asked for.
    let secrets: Vec<String> = vec![
        c.a.org.to_string(),
        c.a.app_id.to_string(),
        c.a.release_id.clone().unwrap().to_string(),
        c.a.instance.clone().unwrap().to_string(),
        // The challenge token of A's custom domain.
        "alphatoken".into(),
    ];
    let mut walked = 0;
    let mut problems = Vec::new();
    let mut n = 0;
    // Deletes last, so that the resources they remove are there for every other operation.
    let mut ops: Vec<(&String, &String, &Value)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(t, item)| {
            item.as_object()
                .unwrap()
                .iter()
                .map(move |(m, op)| (t, m, op))
        })
        .collect();
    ops.sort_by_key(|(_, m, _)| *m == "delete");
    {
        for (template, method, op) in ops {
            let security = &op["security"][0];
            let Some(scopes) = security.get("bearer").and_then(Value::as_array) else {
                continue; // public (healthz)
            };
            let scopes: Vec<Scope> = scopes
                .iter()
                .map(|s| scope_of(s.as_str().unwrap()))
                .collect();
            // Hosts and orgs' limits are the platform's: the operator org acts on them.
            let infra = scopes
                .iter()
                .any(|s| matches!(s, Scope::Host | Scope::Edge))
                || template.starts_with("/v1/hosts")
                || template.starts_with("/v1/orgs");
            let owner = if infra { &c.operator } else { &c.a };
            let has_params = template.contains('{');
            let own_path = fill(template, own_ids(&c, &c.a));
            let what = format!("{} {template}", method.to_uppercase());
            walked += 1;

            // 1. Another org's token.
            n += 1;
            let b_token = c.b.token(Scope::Admin);
            let theirs = call(&c, b_token, method, &own_path, op, n).await;
            if theirs.status >= 500 {
                problems.push(format!(
                    "{what}: org B got {} {}",
                    theirs.status, theirs.text
                ));
            }
            for s in &secrets {
                if !own_path.contains(s.as_str()) && theirs.text.contains(s.as_str()) {
                    problems.push(format!(
                        "{what}: org B's answer contains org A's {s}: {}",
                        theirs.text
                    ));
                }
            }
            if has_params {
                n += 1;
                let missing_path = fill(template, missing_ids);
                let missing = call(&c, b_token, method, &missing_path, op, n).await;
                if (theirs.status, &theirs.code) != (missing.status, &missing.code) {
                    problems.push(format!(
                        "{what}: org A's resource answers org B {} {:?}, a missing one {} {:?}",
                        theirs.status, theirs.code, missing.status, missing.code
                    ));
                }
            }

            // 2. Each insufficient scope.
            if !scopes.is_empty() {
                for s in [
                    Scope::Read,
                    Scope::Deploy,
                    Scope::Exec,
                    Scope::Host,
                    Scope::Edge,
                ] {
                    if scopes.contains(&s) {
                        continue;
                    }
                    n += 1;
                    let path = fill(template, own_ids(&c, &c.a));
                    let a = call(&c, owner.token(s), method, &path, op, n).await;
                    if (a.status, a.code.as_deref()) != (403, Some("insufficient_scope")) {
                        problems.push(format!(
                            "{what} with only the {s} scope: {} {:?}, expected 403 insufficient_scope",
                            a.status, a.code
                        ));
                    }
                }
            }

            // 3. The owner with the right scope finds its resources.
            n += 1;
            let right = scopes.first().copied().unwrap_or(Scope::Read);
            let mine = call(&c, owner.token(right), method, &own_path, op, n).await;
            let reached = mine.status != 404
                && mine.status != 403
                && (mine.status < 500 || mine.code.as_deref() == Some("registry_error"));
            if !reached {
                problems.push(format!(
                    "{what}: the owner with scope {right} got {} {}",
                    mine.status, mine.text
                ));
            }
        }
    }
    assert!(walked >= 20, "walked only {walked} operations");
    assert!(
        problems.is_empty(),
        "tenant isolation leaks:\n{}",
        problems.join("\n")
    );
}
