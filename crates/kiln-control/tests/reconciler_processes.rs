//! The reconciler places every process group of a release: `scale.count` instances of each in
//! every region (on that region's hosts), every WorkloadSpec carrying its group's name, command
//! and services (with their health checks), and naming the capabilities the agent needs. A real SQLite store, no HTTP.

use kiln_control::{Control, ControlConfig, Reconciler};
use kiln_store::{Append, Metadata, NewEvent, Store};
use kiln_types::event::{Driver, Event};
use kiln_types::workload::{CheckKind, CheckSpec};
use kiln_types::{AppId, HostId, ImageRef, MiB, MilliCpu, OrgId, ReleaseId};

const MANIFEST: &str = r#"app = "shop"
regions = ["local", "fra"]

[scale]
count = 1

[processes.web]
command = "/app/server --port 8443"

[processes.web.scale]
count = 2

[[processes.web.services]]
protocol = "tls"
internal_port = 8443

[[processes.web.services.checks]]
kind = "http"
path = "/healthz"

[processes.worker]
command = ["/app/worker"]

[[mounts]]
volume = "scratch"
path = "/scratch"
processes = ["worker"]
"#;

#[tokio::test]
async fn each_process_group_gets_its_instances_and_its_spec() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let control = Control::new(store.clone(), ControlConfig::default()).unwrap();

    let manifest = kiln_manifest::parse("kiln.toml", MANIFEST).unwrap();
    let app_id = AppId::generate();
    let fra_host = HostId::generate();
    let events = vec![
        Event::HostRegistered {
            host_id: HostId::generate(),
            name: "h1".into(),
            index: 1,
            driver: Driver::Runc,
            cpu: MilliCpu(64_000),
            memory: MiB(64 * 1024),
            region: "local".into(),
        },
        Event::HostRegistered {
            host_id: fra_host.clone(),
            name: "h2".into(),
            index: 2,
            driver: Driver::Runc,
            cpu: MilliCpu(64_000),
            memory: MiB(64 * 1024),
            region: "fra".into(),
        },
        Event::AppCreated {
            app_id: app_id.clone(),
            org_id: OrgId::generate(),
            name: "shop".parse().unwrap(),
        },
        Event::ReleaseCreated {
            app_id: app_id.clone(),
            release_id: ReleaseId::generate(),
            version: 1,
            image_input: "127.0.0.1:5000/shop:v1".into(),
            image: ImageRef {
                registry: "127.0.0.1:5000".into(),
                repository: "shop".into(),
                digest: format!("sha256:{}", "1".repeat(64)),
            },
            manifest: serde_json::to_value(&manifest).unwrap(),
            manifest_source: MANIFEST.into(),
            secrets_version: 0,
        },
    ];
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
        .unwrap();

    let reconciler = Reconciler::new(control);
    reconciler.pass().await.unwrap();
    let instances = store.all_instances().await.unwrap();
    let of = |p: &str| {
        instances
            .iter()
            .filter(|i| i.spec.process == p)
            .collect::<Vec<_>>()
    };
    // count × regions per group: web 2 × 2, worker inherits [scale] 1 × 2; each region's on
    // that region's host.
    assert_eq!(of("web").len(), 4, "{instances:#?}");
    assert_eq!(of("worker").len(), 2);
    assert_eq!(instances.len(), 6);
    assert_eq!(
        instances.iter().filter(|i| i.host_id == fra_host).count(),
        3,
        "{instances:#?}"
    );

    let web = &of("web")[0].spec;
    assert_eq!(
        web.command.as_deref().unwrap(),
        ["/app/server", "--port", "8443"]
    );
    assert_eq!(web.services.len(), 1);
    assert_eq!(
        web.services[0].checks,
        vec![CheckSpec {
            kind: CheckKind::Http {
                path: "/healthz".into(),
                tls: true
            },
            ..CheckSpec::default_tcp()
        }]
    );
    assert!(web.mounts.is_empty());
    assert_eq!(web.requires.iter().collect::<Vec<_>>(), ["check.http"]);
    // The runc agent supports no capability yet: it would refuse this spec whole, saying why.
    assert!(web
        .check_runnable(&[])
        .unwrap_err()
        .to_string()
        .contains("check.http"));

    let worker = &of("worker")[0].spec;
    assert_eq!(worker.command.as_deref().unwrap(), ["/app/worker"]);
    assert!(worker.services.is_empty());
    assert_eq!(worker.mounts[0].volume, "scratch");
    assert_eq!(worker.requires.iter().collect::<Vec<_>>(), ["mounts"]);

    // A second pass places nothing more.
    reconciler.pass().await.unwrap();
    assert_eq!(store.all_instances().await.unwrap().len(), 6);
}
