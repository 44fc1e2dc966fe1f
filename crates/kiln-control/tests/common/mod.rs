//! A control plane on 127.0.0.1:0 with a real SQLite store: the operator org (with a host), and
//! two tenant orgs, each with an app, a release and a placed instance.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_control::{Control, ControlConfig, RateLimit, Reconciler, Scope};
use kiln_store::{Append, Metadata, NewEvent, Store};
use kiln_types::event::{Driver, Event};
use kiln_types::{AppId, HostId, ImageRef, InstanceId, MiB, MilliCpu, OrgId, ReleaseId};

pub const SCOPES: [Scope; 8] = [
    Scope::Admin,
    Scope::Read,
    Scope::Deploy,
    Scope::Exec,
    Scope::Host,
    Scope::Edge,
    Scope::SecretsWrite,
    Scope::SecretsRead,
];

/// One org, its tokens by scope, and what it owns.
pub struct Tenant {
    pub org: OrgId,
    /// (scope, token) for each of [`SCOPES`].
    pub tokens: Vec<(Scope, String)>,
    pub app: String,
    pub app_id: AppId,
    pub release_id: Option<ReleaseId>,
    pub instance: Option<InstanceId>,
    /// The id of the tenant's admin token (for routes that name a token).
    pub admin_token_id: String,
}

impl Tenant {
    pub fn token(&self, scope: Scope) -> &str {
        &self.tokens.iter().find(|(s, _)| *s == scope).unwrap().1
    }
}

pub struct Cluster {
    pub _dir: tempfile::TempDir,
    pub control: Arc<Control>,
    pub store: Store,
    pub addr: SocketAddr,
    pub base: String,
    pub operator: Tenant,
    pub host: HostId,
    pub a: Tenant,
    pub b: Tenant,
}

pub fn manifest(app: &str) -> String {
    format!(
        "app = \"{app}\"\n\n[processes.app]\ncommand = \"/app/server\"\n\n\
         [[processes.app.services]]\nprotocol = \"tls\"\ninternal_port = 8443\n"
    )
}

async fn append(store: &Store, events: Vec<Event>) {
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
}

async fn tenant(control: &Control, store: &Store, org: OrgId, name: &str, app: &str) -> Tenant {
    if control.first_org().await.unwrap().as_ref() != Some(&org) {
        append(
            store,
            vec![Event::OrgCreated {
                org_id: org.clone(),
                name: name.into(),
            }],
        )
        .await;
    }
    let mut tokens = Vec::new();
    for s in SCOPES {
        let t = control
            .create_token(&org, &format!("{name}-{s}"), &[s])
            .await
            .unwrap();
        tokens.push((s, t));
    }
    let admin_secret = &tokens.iter().find(|(s, _)| *s == Scope::Admin).unwrap().1;
    use sha2::Digest;
    let admin_token_id = store
        .token_by_hash(hex::encode(sha2::Sha256::digest(admin_secret.as_bytes())))
        .await
        .unwrap()
        .unwrap()
        .id
        .to_string();
    let app_id = AppId::generate();
    let mut release_id = None;
    if !app.is_empty() {
        let source = manifest(app);
        let m = kiln_manifest::parse("kiln.toml", &source).unwrap();
        let rel = ReleaseId::generate();
        release_id = Some(rel.clone());
        append(
            store,
            vec![
                Event::AppCreated {
                    app_id: app_id.clone(),
                    org_id: org.clone(),
                    name: app.parse().unwrap(),
                },
                Event::ReleaseCreated {
                    app_id: app_id.clone(),
                    release_id: rel,
                    version: 1,
                    image_input: "127.0.0.1:5000/x:v1".into(),
                    image: ImageRef {
                        registry: "127.0.0.1:5000".into(),
                        repository: "x".into(),
                        digest: format!("sha256:{}", "1".repeat(64)),
                    },
                    manifest: serde_json::to_value(&m).unwrap(),
                    manifest_source: source,
                    secrets_version: 0,
                },
            ],
        )
        .await;
    }
    Tenant {
        admin_token_id,
        org,
        tokens,
        app: app.into(),
        app_id,
        release_id,
        instance: None,
    }
}

/// A DNS server on 127.0.0.1 that answers every query NXDOMAIN: the resolver of clusters whose
/// test does not bring its own, so that verifying a domain never sends a query off the machine.
async fn nxdomain_resolver() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            if n < 12 {
                continue;
            }
            let mut answer = buf[..n].to_vec();
            answer[2] = 0x81 | (answer[2] & 0x01); // QR, RD copied
            answer[3] = 0x83; // RA, NXDOMAIN
            answer[6..12].fill(0);
            let _ = socket.send_to(&answer, peer).await;
        }
    });
    addr
}

/// The custom domain org A has added (pending) in every cluster.
pub const A_DOMAIN: &str = "www.alpha.example";

impl Cluster {
    pub async fn start(rate_limit: RateLimit) -> Cluster {
        Self::start_with(rate_limit, None).await
    }

    /// A cluster whose control plane verifies domains through `dns` (default: a loopback
    /// resolver answering NXDOMAIN to everything).
    pub async fn start_with(rate_limit: RateLimit, dns: Option<SocketAddr>) -> Cluster {
        let dns = match dns {
            Some(d) => d,
            None => nxdomain_resolver().await,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("kiln.db"))
            .await
            .unwrap();
        let control = Control::new(
            store.clone(),
            ControlConfig {
                rate_limit,
                master_key: Some(master_key(dir.path())),
                dns_resolver: Some(dns),
                ..Default::default()
            },
        )
        .unwrap();
        control.bootstrap("ops").await.unwrap();
        let ops_org = control.first_org().await.unwrap().unwrap();
        let operator = tenant(&control, &store, ops_org, "ops", "").await;
        let host = HostId::generate();
        append(
            &store,
            vec![Event::HostRegistered {
                host_id: host.clone(),
                name: "h1".into(),
                index: 1,
                driver: Driver::Runc,
                cpu: MilliCpu(64_000),
                memory: MiB(64 * 1024),
                region: "local".into(),
            }],
        )
        .await;
        let mut a = tenant(&control, &store, OrgId::generate(), "orga", "alpha").await;
        let mut b = tenant(&control, &store, OrgId::generate(), "orgb", "bravo").await;
        // Org A holds a dedicated IPv4 and a custom domain (the walk releases them as A, and must not
        // see them as B).
        append(
            &store,
            vec![
                Event::Ipv4Allocated {
                    app_id: a.app_id.clone(),
                    address: "203.0.113.9".parse().unwrap(),
                },
                Event::DomainAdded {
                    app_id: a.app_id.clone(),
                    env: "production".into(),
                    hostname: A_DOMAIN.parse().unwrap(),
                    token: "alphatoken".into(),
                },
            ],
        )
        .await;
        Reconciler::new(control.clone()).pass().await.unwrap();
        for t in [&mut a, &mut b] {
            t.instance = store
                .instances_of_app(t.app_id.clone())
                .await
                .unwrap()
                .first()
                .map(|i| i.id.clone());
            assert!(t.instance.is_some(), "the reconciler placed no instance");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = control.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Cluster {
            _dir: dir,
            control,
            store,
            addr,
            base: format!("http://{addr}"),
            operator,
            host,
            a,
            b,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// No limit that a test's requests could reach.
pub fn unlimited() -> RateLimit {
    RateLimit {
        per_second: 1e6,
        burst: 1_000_000,
        max_callers: 10_000,
    }
}

/// A master key file for secrets in `dir`, so the secrets routes are walked for real.
pub fn master_key(dir: &std::path::Path) -> kiln_control::secrets::MasterKeySource {
    let path = dir.join("master.key");
    kiln_control::secrets::ensure_key_file(&path).unwrap();
    kiln_control::secrets::MasterKeySource::File(path)
}
