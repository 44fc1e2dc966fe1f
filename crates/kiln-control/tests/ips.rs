//! The IPv4 add-on through the real API: allocating a dedicated address from the pool (one per
//! app, replayed for a retried idempotency key, a clear error when the pool is exhausted or
//! absent), releasing it, and another org seeing none of it (the port routes it gives edges are
//! covered by `edge_routes.rs`).

use std::sync::Arc;

use kiln_api::Client;
use kiln_control::{Control, ControlConfig, Scope};
use kiln_store::Store;
use kiln_types::net::Ipv4Pool;

async fn serve(config: ControlConfig) -> (tempfile::TempDir, Arc<Control>, String, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let control = Control::new(store.clone(), config).unwrap();
    control.bootstrap("test").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = control.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (dir, control, format!("http://{addr}"), store)
}

async fn client(control: &Control, url: &str, scopes: &[Scope]) -> Client {
    let org = control.first_org().await.unwrap().unwrap();
    let token = control.create_token(&org, "t", scopes).await.unwrap();
    Client::new(url, &token).unwrap()
}

#[tokio::test]
async fn dedicated_ipv4_is_allocated_replayed_and_released() {
    let (_dir, control, url, _store) = serve(ControlConfig {
        ipv4_pool: Some(Ipv4Pool::parse("203.0.113.0/31").unwrap()),
        ..Default::default()
    })
    .await;
    let api = client(&control, &url, &[Scope::Admin]).await;
    for name in ["web", "db", "third"] {
        api.create_app(&name.parse().unwrap()).await.unwrap();
    }

    let a = api.allocate_ipv4("web", "key-1").await.unwrap().address;
    assert_eq!(a.to_string(), "203.0.113.0");
    // A retry with the same key gets the same answer; a new request is refused: one per app.
    assert_eq!(api.allocate_ipv4("web", "key-1").await.unwrap().address, a);
    let err = api.allocate_ipv4("web", "key-2").await.unwrap_err();
    assert_eq!(err.code(), Some("ipv4_exists"), "{err}");
    assert!(err.to_string().contains("203.0.113.0"), "{err}");

    let b = api.allocate_ipv4("db", "key-3").await.unwrap().address;
    assert_eq!(b.to_string(), "203.0.113.1");
    let err = api.allocate_ipv4("third", "key-4").await.unwrap_err();
    assert_eq!(err.code(), Some("ipv4_pool_exhausted"), "{err}");
    assert!(err.to_string().contains("203.0.113.0/31"), "{err}");

    let ips = api.ips("web").await.unwrap();
    assert_eq!(ips.dedicated_ipv4, vec![a]);
    assert!(ips.shared_ports.is_empty());

    // Releasing frees the address for another app; an address the app does not hold is 404.
    let err = api.release_ip("web", b).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");
    api.release_ip("web", a).await.unwrap();
    assert!(api.ips("web").await.unwrap().dedicated_ipv4.is_empty());
    assert_eq!(
        api.allocate_ipv4("third", "key-5").await.unwrap().address,
        a
    );

    // Bad input names what is wrong.
    let raw = reqwest::Client::new();
    let token = control
        .create_token(
            &control.first_org().await.unwrap().unwrap(),
            "raw",
            &[Scope::Admin],
        )
        .await
        .unwrap();
    let resp = raw
        .post(format!("{url}/v1/apps/web/ips"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"kind": "v6"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "invalid_ip_kind");

    // A read-only token may list but not allocate.
    let reader = client(&control, &url, &[Scope::Read]).await;
    reader.ips("db").await.unwrap();
    let err = reader.allocate_ipv4("web", "key-6").await.unwrap_err();
    assert_eq!(err.code(), Some("insufficient_scope"), "{err}");
}

#[tokio::test]
async fn without_a_pool_the_add_on_is_off_and_other_orgs_see_nothing() {
    let (_dir, control, url, store) = serve(ControlConfig::default()).await;
    let api = client(&control, &url, &[Scope::Admin]).await;
    api.create_app(&"web".parse().unwrap()).await.unwrap();
    let err = api.allocate_ipv4("web", "k").await.unwrap_err();
    assert_eq!(err.code(), Some("ipv4_unavailable"), "{err}");
    assert!(err.to_string().contains("--ipv4-pool"), "{err}");

    // Another org's token: the app does not exist for it.
    let other_org = kiln_types::OrgId::generate();
    store
        .append(kiln_store::Append {
            events: vec![kiln_store::NewEvent::any(
                kiln_types::event::Event::OrgCreated {
                    org_id: other_org.clone(),
                    name: "other".into(),
                },
            )],
            metadata: Default::default(),
            idempotency: None,
        })
        .await
        .unwrap();
    let token = control
        .create_token(&other_org, "x", &[Scope::Admin])
        .await
        .unwrap();
    let other = Client::new(&url, &token).unwrap();
    let err = other.ips("web").await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");
}
