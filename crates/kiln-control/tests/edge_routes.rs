//! The route table an edge gets from `GET /v1/routes`: SNI routes with the service's limits, port
//! routes for the shared ports an app owns (`port_allocated`) and for its dedicated IPv4
//! (`ipv4_allocated`), and the allocations view refusing a port two apps claim. A real SQLite
//! store, the real router on 127.0.0.1:0, the real client; instances placed by the reconciler and
//! reported healthy as an agent would.

use std::net::SocketAddr;
use std::time::Duration;

use kiln_control::{Control, ControlConfig, Reconciler, Scope};
use kiln_store::{Append, Metadata, NewEvent, Store};
use kiln_types::event::{Driver, Event};
use kiln_types::workload::Concurrency;
use kiln_types::{
    AppId, HostId, ImageRef, InstanceState, MiB, MilliCpu, ReleaseId, ServiceProtocol,
};

fn manifest(app: &str, service: &str) -> String {
    format!("app = \"{app}\"\n\n[processes.app]\ncommand = \"/app/server\"\n\n{service}")
}

fn release(app_id: &AppId, source: &str) -> Event {
    let m = kiln_manifest::parse("kiln.toml", source).unwrap();
    Event::ReleaseCreated {
        app_id: app_id.clone(),
        release_id: ReleaseId::generate(),
        version: 1,
        image_input: "127.0.0.1:5000/x:v1".into(),
        image: ImageRef {
            registry: "127.0.0.1:5000".into(),
            repository: "x".into(),
            digest: format!("sha256:{}", "1".repeat(64)),
        },
        manifest: serde_json::to_value(&m).unwrap(),
        manifest_source: source.into(),
        secrets_version: 0,
    }
}

async fn append(store: &Store, events: Vec<Event>) -> Result<(), kiln_store::StoreError> {
    store
        .append(Append {
            events: events.into_iter().map(NewEvent::any).collect(),
            metadata: Metadata {
                actor: "test".into(),
                ..Default::default()
            },
            idempotency: None,
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn shared_ports_and_dedicated_addresses_become_port_routes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let control = Control::new(store.clone(), ControlConfig::default()).unwrap();
    control.bootstrap("test").await.unwrap();
    let org = control.first_org().await.unwrap().unwrap();
    let token = control
        .create_token(&org, "edge", &[Scope::Edge])
        .await
        .unwrap();

    let db = AppId::generate();
    let web = AppId::generate();
    let dedicated: std::net::Ipv4Addr = "198.51.100.7".parse().unwrap();
    let db_manifest = manifest(
        "db",
        "[[processes.app.services]]\nprotocol = \"tcp\"\ninternal_port = 5432\nports = [5432]\nproxy_protocol = true\n",
    );
    let web_manifest = manifest(
        "web",
        "[[processes.app.services]]\nprotocol = \"tls\"\ninternal_port = 8443\n",
    );
    append(
        &store,
        vec![
            Event::HostRegistered {
                host_id: HostId::generate(),
                name: "h1".into(),
                index: 1,
                driver: Driver::Runc,
                cpu: MilliCpu(64_000),
                memory: MiB(64 * 1024),
                region: "local".into(),
            },
            Event::AppCreated {
                app_id: db.clone(),
                org_id: org.clone(),
                name: "db".parse().unwrap(),
            },
            release(&db, &db_manifest),
            Event::PortAllocated {
                app_id: db.clone(),
                port: 5432,
            },
            Event::AppCreated {
                app_id: web.clone(),
                org_id: org.clone(),
                name: "web".parse().unwrap(),
            },
            release(&web, &web_manifest),
            Event::Ipv4Allocated {
                app_id: web.clone(),
                address: dedicated,
            },
        ],
    )
    .await
    .unwrap();

    // A second app cannot take a port that is allocated: the view refuses the append.
    let other = AppId::generate();
    assert!(append(
        &store,
        vec![Event::PortAllocated {
            app_id: other,
            port: 5432
        }]
    )
    .await
    .is_err());

    Reconciler::new(control.clone()).pass().await.unwrap();
    let instances = store.all_instances().await.unwrap();
    assert_eq!(instances.len(), 2);
    append(
        &store,
        instances
            .iter()
            .map(|i| Event::InstanceStateChanged {
                instance_id: i.id.clone(),
                app_id: i.app_id.clone(),
                state: InstanceState::Healthy,
                reason: None,
            })
            .collect(),
    )
    .await
    .unwrap();
    let backend = |app: &AppId, port: u16| {
        let i = instances.iter().find(|i| &i.app_id == app).unwrap();
        SocketAddr::new(i.spec.network.ipv6.into(), port)
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = control.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = kiln_api::Client::new(&format!("http://{addr}"), &token).unwrap();
    let table = client.routes(0, Duration::ZERO).await.unwrap();

    // web: its SNI route, with the default limits, and 443 on its dedicated address.
    let web_route = table
        .routes
        .iter()
        .find(|r| r.hostname.starts_with("web."))
        .unwrap();
    assert_eq!(web_route.backends, [backend(&web, 8443)]);
    assert_eq!(web_route.concurrency, Some(Concurrency::default()));
    let listens: Vec<String> = table.ports.iter().map(|p| p.listen.to_string()).collect();
    assert_eq!(listens, ["0.0.0.0:5432", "198.51.100.7:443", "[::]:5432"]);
    let web_port = &table.ports[1];
    assert_eq!(web_port.app.as_str(), "web");
    assert_eq!(web_port.protocol, ServiceProtocol::Tls);
    assert_eq!(web_port.backends, [backend(&web, 8443)]);
    // db: its shared port on every address, no SNI route.
    for p in [&table.ports[0], &table.ports[2]] {
        assert_eq!(p.app.as_str(), "db");
        assert_eq!(p.protocol, ServiceProtocol::Tcp);
        assert!(p.proxy_protocol);
        assert_eq!(p.backends, [backend(&db, 5432)]);
    }
    assert!(!table.routes.iter().any(|r| r.app.as_str() == "db"));
}
