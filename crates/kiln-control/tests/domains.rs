//! Custom domains end to end in process: a real SQLite store, the real router on 127.0.0.1:0, and
//! a real DNS server (Debian's dnsmasq on loopback, started by the test) answering the challenge.
//! Adding, proving ownership by DNS, the edges' route table before and after, the platform-wide
//! rules (one verified holder, no theft, reserved and malformed names) and removal.

mod common;

use std::time::Duration;

use common::{unlimited, Cluster};
use kiln_control::Scope;
use kiln_testkit::dnsmasq::{free_port, Dnsmasq};
use kiln_types::event::Event;
use kiln_types::InstanceState;
use serde_json::{json, Value};

const HOST: &str = "shop.example.test";

struct Answer {
    status: u16,
    body: Value,
}

async fn call(c: &Cluster, token: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
    let mut rb = reqwest::Client::new()
        .request(method.parse().unwrap(), c.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    Answer { status, body }
}

fn code(a: &Answer) -> (u16, &str) {
    (a.status, a.body["code"].as_str().unwrap_or(""))
}

async fn routed(c: &Cluster) -> Vec<(String, String, Vec<String>)> {
    let client = kiln_api::Client::new(&c.base, c.operator.token(Scope::Edge)).unwrap();
    let table = client.routes(0, Duration::ZERO).await.unwrap();
    table
        .routes
        .into_iter()
        .map(|r| {
            (
                r.hostname,
                r.app.to_string(),
                r.backends.iter().map(|b| b.to_string()).collect(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_is_routed_only_once_dns_proves_it_and_never_stolen() {
    let dns_addr = free_port().unwrap();
    // Before the owner publishes anything: the zone has an unrelated, wrong challenge.
    let dns = Dnsmasq::start_at(
        dns_addr,
        &[("_kiln-challenge.shop.example.test", "kiln-verify=wrong")],
    )
    .unwrap();
    let c = Cluster::start_with(unlimited(), Some(dns_addr)).await;
    // A's instance serves: its default hostname is routed.
    c.store
        .append(kiln_store::Append {
            events: vec![kiln_store::NewEvent::any(Event::InstanceStateChanged {
                instance_id: c.a.instance.clone().unwrap(),
                app_id: c.a.app_id.clone(),
                state: InstanceState::Healthy,
                reason: None,
            })],
            metadata: Default::default(),
            idempotency: None,
        })
        .await
        .unwrap();
    let a = c.a.token(Scope::Deploy);
    let b = c.b.token(Scope::Deploy);
    let base = format!("/v1/apps/{}/domains", c.a.app);
    let b_base = format!("/v1/apps/{}/domains", c.b.app);

    // Add: pending, with the records to create.
    let added = call(
        &c,
        a,
        "POST",
        &base,
        Some(json!({"hostname": "Shop.Example.Test."})),
    )
    .await;
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(added.body["hostname"], HOST);
    assert_eq!(added.body["status"], "pending");
    assert_eq!(
        added.body["challenge"]["name"],
        "_kiln-challenge.shop.example.test"
    );
    assert_eq!(added.body["challenge"]["type"], "TXT");
    let value = added.body["challenge"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        value.starts_with("kiln-verify=") && value.len() == 12 + 32,
        "{value}"
    );
    assert_eq!(added.body["traffic"]["type"], "CNAME");
    assert_eq!(added.body["traffic"]["value"], "alpha.kiln.test");
    // Pending: not routed, but the default hostname is.
    let routes = routed(&c).await;
    assert!(routes.iter().any(|r| r.0 == "alpha.kiln.test"));
    assert!(!routes.iter().any(|r| r.0 == HOST), "{routes:?}");

    // Another org may claim it too while it is unverified (DNS decides).
    let b_added = call(&c, b, "POST", &b_base, Some(json!({"hostname": HOST}))).await;
    assert_eq!(b_added.status, 201, "{}", b_added.body);
    assert_ne!(b_added.body["challenge"]["value"].as_str().unwrap(), value);

    // DNS holds the wrong token: refused, saying what DNS answered.
    let verify = format!("{base}/{HOST}/verify");
    let refused = call(&c, a, "POST", &verify, None).await;
    assert_eq!(
        code(&refused),
        (422, "domain_not_verified"),
        "{}",
        refused.body
    );
    assert_eq!(
        refused.body["errors"]["found"],
        json!(["kiln-verify=wrong"])
    );
    assert_eq!(refused.body["errors"]["expected"], value.as_str());
    assert!(!routed(&c).await.iter().any(|r| r.0 == HOST));

    // The owner publishes the record: verified, and routed like the default hostname.
    drop(dns);
    let dns = Dnsmasq::start_at(
        dns_addr,
        &[("_kiln-challenge.shop.example.test", value.as_str())],
    )
    .unwrap();
    let ok = call(&c, a, "POST", &verify, None).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["status"], "verified");
    assert!(ok.body["verified_at"].is_i64());
    let routes = routed(&c).await;
    let default = routes.iter().find(|r| r.0 == "alpha.kiln.test").unwrap();
    let custom = routes.iter().find(|r| r.0 == HOST).unwrap();
    assert_eq!((&custom.1, &custom.2), (&default.1, &default.2));
    assert!(!custom.2.is_empty());
    // Verifying again is a no-op answer.
    assert_eq!(call(&c, a, "POST", &verify, None).await.status, 200);

    // The verified claim cannot be taken: not by B's pending claim, not by a new add.
    let theirs = call(&c, b, "POST", &format!("{b_base}/{HOST}/verify"), None).await;
    assert_eq!(code(&theirs), (409, "domain_taken"), "{}", theirs.body);
    let c_org_add = call(
        &c,
        c.operator.token(Scope::Deploy),
        "POST",
        &base,
        Some(json!({"hostname": HOST})),
    )
    .await;
    assert_eq!(
        code(&c_org_add).0,
        404,
        "the operator org does not own app alpha"
    );
    call(&c, b, "DELETE", &format!("{b_base}/{HOST}"), None).await;
    let again = call(&c, b, "POST", &b_base, Some(json!({"hostname": HOST}))).await;
    assert_eq!(code(&again), (409, "domain_taken"), "{}", again.body);

    // Tenant isolation: B cannot read or verify A's domain (404, like a missing app).
    let peek = call(
        &c,
        c.b.token(Scope::Read),
        "GET",
        &format!("{base}/{HOST}"),
        None,
    )
    .await;
    assert_eq!(peek.status, 404);
    let peek = call(&c, b, "POST", &verify, None).await;
    assert_eq!(code(&peek), (404, "not_found"));
    let peek = call(&c, c.b.token(Scope::Admin), "GET", &base, None).await;
    assert_eq!(peek.status, 404);
    let b_list = call(&c, c.b.token(Scope::Read), "GET", &b_base, None).await;
    assert_eq!(b_list.body["items"], json!([]));

    // The same app adding it twice: 409 domain_exists.
    let twice = call(&c, a, "POST", &base, Some(json!({"hostname": HOST}))).await;
    assert_eq!(code(&twice), (409, "domain_exists"));

    // List and show.
    let list = call(&c, c.a.token(Scope::Read), "GET", &base, None).await;
    let names: Vec<&str> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(names, [HOST, common::A_DOMAIN]);
    let show = call(
        &c,
        c.a.token(Scope::Read),
        "GET",
        &format!("{base}/{HOST}"),
        None,
    )
    .await;
    assert_eq!(show.body["status"], "verified");

    // Remove: no longer routed, gone; then B can claim and verify it.
    let removed = call(&c, a, "DELETE", &format!("{base}/{HOST}"), None).await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert!(!routed(&c).await.iter().any(|r| r.0 == HOST));
    let gone = call(
        &c,
        c.a.token(Scope::Read),
        "GET",
        &format!("{base}/{HOST}"),
        None,
    )
    .await;
    assert_eq!(gone.status, 404);
    let b_again = call(&c, b, "POST", &b_base, Some(json!({"hostname": HOST}))).await;
    assert_eq!(b_again.status, 201, "{}", b_again.body);
    drop(dns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_checked_and_adds_are_idempotent() {
    let c = Cluster::start(unlimited()).await;
    let a = c.a.token(Scope::Deploy);
    let base = format!("/v1/apps/{}/domains", c.a.app);
    for (hostname, expected) in [
        ("10.0.0.1", "invalid_hostname"),
        ("a.*.example.com", "invalid_hostname"),
        ("*.com", "invalid_hostname"),
        ("*.kiln.test", "hostname_reserved"),
        ("localhost", "invalid_hostname"),
        ("a_b.example.com", "invalid_hostname"),
        ("bravo.kiln.test", "hostname_reserved"),
        ("kiln.test", "hostname_reserved"),
    ] {
        let r = call(&c, a, "POST", &base, Some(json!({ "hostname": hostname }))).await;
        assert_eq!(code(&r), (422, expected), "{hostname}: {}", r.body);
    }
    // A retried add (same Idempotency-Key) answers the same domain, same token.
    let add = || async {
        let resp = reqwest::Client::new()
            .post(c.url(&base))
            .bearer_auth(a)
            .header("idempotency-key", "add-api")
            .json(&json!({"hostname": "api.example.com"}))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };
    let (s1, first) = add().await;
    let (s2, second) = add().await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first["challenge"], second["challenge"]);
    // The stub resolver answers NXDOMAIN: the refusal says so.
    let r = call(
        &c,
        a,
        "POST",
        &format!("{base}/api.example.com/verify"),
        None,
    )
    .await;
    assert_eq!(code(&r), (422, "domain_not_verified"));
    assert_eq!(r.body["errors"]["rcode"], "NXDOMAIN");
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("no TXT record (NXDOMAIN)"));
    // A deploy scope is needed to add; read is enough to list.
    let r = call(
        &c,
        c.a.token(Scope::Read),
        "POST",
        &base,
        Some(json!({"hostname": "x.example.com"})),
    )
    .await;
    assert_eq!(code(&r), (403, "insufficient_scope"));
}

/// The background re-check verifies a pending domain once DNS holds its record, without a
/// request; a domain whose record is wrong stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_recheck_verifies_pending_domains() {
    let dns_addr = free_port().unwrap();
    let c = Cluster::start_with(unlimited(), Some(dns_addr)).await;
    let a = c.a.token(Scope::Deploy);
    let base = format!("/v1/apps/{}/domains", c.a.app);
    let added = call(&c, a, "POST", &base, Some(json!({"hostname": HOST}))).await;
    let value = added.body["challenge"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let _dns = Dnsmasq::start_at(
        dns_addr,
        &[
            ("_kiln-challenge.shop.example.test", value.as_str()),
            ("_kiln-challenge.www.alpha.example", "kiln-verify=wrong"),
        ],
    )
    .unwrap();
    let checks = tokio::spawn(kiln_control::run_domain_checks(
        c.control.clone(),
        kiln_control::CheckSchedule {
            tick: Duration::from_millis(20),
            first: Duration::from_millis(50),
            ..Default::default()
        },
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = |h: &str| {
        let path = format!("{base}/{h}");
        let c = &c;
        async move {
            call(c, c.a.token(Scope::Read), "GET", &path, None)
                .await
                .body["status"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    while status(HOST).await != "verified" {
        assert!(
            std::time::Instant::now() < deadline,
            "not verified in the background"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(common::A_DOMAIN).await, "pending");
    // The verification is an event like any other, by the checker.
    let events = c.store.read_after(0, 10_000).await.unwrap();
    let by = events
        .iter()
        .find(|e| matches!(&e.event, Event::DomainVerified { hostname, .. } if hostname.as_str() == HOST))
        .unwrap();
    assert_eq!(by.metadata.actor, "system:domain-check");
    checks.abort();
}

/// Another app's manifest `hostnames` route a name only until an app verifies it: then the
/// verified holder alone gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_domain_wins_over_another_apps_manifest_hostnames() {
    let dns_addr = free_port().unwrap();
    let c = Cluster::start_with(unlimited(), Some(dns_addr)).await;
    // B deploys a release whose service lists A's hostname.
    let source = format!("{}hostnames = [\"{HOST}\"]\n", common::manifest(&c.b.app));
    let m = kiln_manifest::parse("kiln.toml", &source).unwrap();
    c.store
        .append(kiln_store::Append {
            events: vec![kiln_store::NewEvent::any(Event::ReleaseCreated {
                app_id: c.b.app_id.clone(),
                release_id: kiln_types::ReleaseId::generate(),
                version: 2,
                image_input: "127.0.0.1:5000/x:v2".into(),
                image: kiln_types::ImageRef {
                    registry: "127.0.0.1:5000".into(),
                    repository: "x".into(),
                    digest: format!("sha256:{}", "2".repeat(64)),
                },
                manifest: serde_json::to_value(&m).unwrap(),
                manifest_source: source,
                secrets_version: 0,
            })],
            metadata: Default::default(),
            idempotency: None,
        })
        .await
        .unwrap();
    kiln_control::Reconciler::new(c.control.clone())
        .pass()
        .await
        .unwrap();
    let mut healthy = Vec::new();
    for app in [&c.a.app_id, &c.b.app_id] {
        for i in c.store.instances_of_app(app.clone()).await.unwrap() {
            healthy.push(kiln_store::NewEvent::any(Event::InstanceStateChanged {
                instance_id: i.id,
                app_id: app.clone(),
                state: InstanceState::Healthy,
                reason: None,
            }));
        }
    }
    c.store
        .append(kiln_store::Append {
            events: healthy,
            metadata: Default::default(),
            idempotency: None,
        })
        .await
        .unwrap();
    let by_host = |routes: &[(String, String, Vec<String>)], h: &str| {
        routes.iter().find(|r| r.0 == h).cloned()
    };
    let routes = routed(&c).await;
    assert_eq!(by_host(&routes, HOST).unwrap().1, "bravo", "{routes:?}");

    // A proves the name: it routes to A, with A's backends, and no longer to B.
    let a = c.a.token(Scope::Deploy);
    let base = format!("/v1/apps/{}/domains", c.a.app);
    let added = call(&c, a, "POST", &base, Some(json!({"hostname": HOST}))).await;
    let value = added.body["challenge"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let _dns = Dnsmasq::start_at(
        dns_addr,
        &[("_kiln-challenge.shop.example.test", value.as_str())],
    )
    .unwrap();
    let ok = call(&c, a, "POST", &format!("{base}/{HOST}/verify"), None).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let routes = routed(&c).await;
    let custom = by_host(&routes, HOST).unwrap();
    let alpha = by_host(&routes, "alpha.kiln.test").unwrap();
    assert_eq!((custom.1.as_str(), &custom.2), ("alpha", &alpha.2));
    assert!(by_host(&routes, "bravo.kiln.test").is_some());
}

/// A wildcard domain is proven at `_kiln-challenge.<base>` and routed as `*.<base>` (the edge
/// matches one label: tests/edge.rs in kiln-edge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_domain_is_proven_at_its_base_and_routed() {
    let dns_addr = free_port().unwrap();
    let c = Cluster::start_with(unlimited(), Some(dns_addr)).await;
    c.store
        .append(kiln_store::Append {
            events: vec![kiln_store::NewEvent::any(Event::InstanceStateChanged {
                instance_id: c.a.instance.clone().unwrap(),
                app_id: c.a.app_id.clone(),
                state: InstanceState::Healthy,
                reason: None,
            })],
            metadata: Default::default(),
            idempotency: None,
        })
        .await
        .unwrap();
    let a = c.a.token(Scope::Deploy);
    let base = format!("/v1/apps/{}/domains", c.a.app);
    let added = call(
        &c,
        a,
        "POST",
        &base,
        Some(json!({"hostname": "*.Wild.Example.Test"})),
    )
    .await;
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(added.body["hostname"], "*.wild.example.test");
    assert_eq!(
        added.body["challenge"]["name"],
        "_kiln-challenge.wild.example.test"
    );
    assert_eq!(added.body["traffic"]["name"], "*.wild.example.test");
    let value = added.body["challenge"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let _dns = Dnsmasq::start_at(
        dns_addr,
        &[("_kiln-challenge.wild.example.test", value.as_str())],
    )
    .unwrap();
    let ok = call(
        &c,
        a,
        "POST",
        &format!("{base}/*.wild.example.test/verify"),
        None,
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let routes = routed(&c).await;
    let wild = routes
        .iter()
        .find(|r| r.0 == "*.wild.example.test")
        .unwrap();
    let alpha = routes.iter().find(|r| r.0 == "alpha.kiln.test").unwrap();
    assert_eq!((&wild.1, &wild.2), (&alpha.1, &alpha.2));
}
