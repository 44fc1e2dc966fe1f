//! `./scripts/bench api`: latency and throughput of the control-plane API under concurrent
//! clients.
//!
//! One control plane in this process (the real router on 127.0.0.1:0, a SQLite store in a temp
//! dir: the `kilnd dev` default), a local registry with one small image, and HTTP/1.1 keep-alive
//! clients (reqwest), each sending its next request as soon as the previous one answered:
//! - reads: `GET /v1/apps/{app}/status` (app, releases, instances from the views) for 5 s at 1,
//!   16 and 64 clients;
//! - deploys: `POST /v1/apps/{app}/releases` (manifest parse, image tag resolved on the registry,
//!   release appended with its `Idempotency-Key` and the audit event) for 5 s at 1, 8 and 32
//!   clients, each deploying its own app (concurrent deploys of one app serialize on its stream).
//!
//! The reconciler does not run: this measures the API, not placement. The rate limit is raised
//! out of the way (one token makes every request). Every answer must be 200/201.
//!
//! Ends with `read_rps`, `read_p50_ms`, `read_p99_ms` (16 clients) and `deploy_rps`,
//! `deploy_p50_ms`, `deploy_p99_ms` (8 clients). `KILN_BENCH_API_SECS` sets the phase length.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use kiln_control::{Control, ControlConfig, RateLimit};

use crate::image::ImageBuilder;
use crate::registry::Registry;

struct Phase {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn pct_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1].as_secs_f64() * 1e3
    }
}

/// Runs `clients` loops of `request(client_index, n)` for `secs`.
async fn phase<F, Fut>(clients: usize, secs: Duration, request: F) -> Phase
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let request = Arc::new(request);
    let start = Instant::now();
    let deadline = start + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let request = request.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut n = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                if !request(c, n).await {
                    errors += 1;
                }
                lat.push(t.elapsed());
                n += 1;
            }
            (lat, errors)
        });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (lat, e) = r.expect("client task");
        latencies.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Phase {
        requests: latencies.len(),
        errors,
        elapsed,
        latencies,
    }
}

fn report(name: &str, clients: usize, p: &Phase) {
    println!(
        "{name:<7} clients={clients:<3} requests={:<7} errors={} rps={:>8.0} p50={:>7.2} ms p99={:>7.2} ms",
        p.requests,
        p.errors,
        p.rps(),
        p.pct_ms(0.50),
        p.pct_ms(0.99)
    );
}

fn manifest(app: &str) -> String {
    format!(
        "app = \"{app}\"\n\n[processes.app]\ncommand = \"/app/server\"\n\n\
         [[processes.app.services]]\nprotocol = \"tls\"\ninternal_port = 8443\n"
    )
}

pub async fn run() -> Result<()> {
    let secs = Duration::from_secs(
        std::env::var("KILN_BENCH_API_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    let dir = tempfile::tempdir()?;
    let registry = Registry::start(&dir.path().join("registry")).await?;
    let image = ImageBuilder::new()
        .file("/app/server", b"#!/bin/sh\n".to_vec(), 0o755)
        .build()?;
    image.push(&registry.host(), "bench/app", "v1").await?;
    let image_ref = format!("{}/bench/app:v1", registry.host());

    let store = kiln_store::Store::open_sqlite(&dir.path().join("kiln.db")).await?;
    let control = Control::new(
        store,
        ControlConfig {
            rate_limit: RateLimit {
                per_second: 1e9,
                burst: u32::MAX,
                max_callers: 10_000,
            },
            ..Default::default()
        },
    )?;
    let token = control
        .bootstrap("bench")
        .await?
        .context("fresh store bootstraps")?
        .admin_token;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = control.router();
    tokio::spawn(async move { axum::serve(listener, router).await });

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    const DEPLOYERS: usize = 32;
    for i in 0..DEPLOYERS {
        let resp = http
            .post(format!("{base}/v1/apps"))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "name": format!("bench{i}") }))
            .send()
            .await?;
        ensure!(resp.status() == 201, "create app: {}", resp.status());
    }
    // One release, so that status has something to read.
    let first = http
        .post(format!("{base}/v1/apps/bench0/releases"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "manifest": manifest("bench0"), "image": image_ref }))
        .send()
        .await?;
    ensure!(
        first.status() == 201,
        "first release: {} {}",
        first.status(),
        first.text().await.unwrap_or_default()
    );

    println!(
        "api bench: {} s per phase, SQLite store, {} build",
        secs.as_secs(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let mut figures = Vec::new();
    for clients in [1, 16, 64] {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        let p = phase(clients, secs, move |_, _| {
            let req = http
                .get(format!("{base}/v1/apps/bench0/status"))
                .bearer_auth(&token);
            async move { req.send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        report("read", clients, &p);
        ensure!(p.errors == 0, "{} reads failed", p.errors);
        if clients == 16 {
            figures.push(("read", p));
        }
    }
    for (round, clients) in [1, 8, 32].into_iter().enumerate() {
        let (http, base, token, image_ref) =
            (http.clone(), base.clone(), token.clone(), image_ref.clone());
        let p = phase(clients, secs, move |c, n| {
            let app = format!("bench{c}");
            let req = http
                .post(format!("{base}/v1/apps/{app}/releases"))
                .bearer_auth(&token)
                .header("idempotency-key", format!("r{round}-c{c}-n{n}"))
                .json(&serde_json::json!({ "manifest": manifest(&app), "image": image_ref }));
            async move { req.send().await.is_ok_and(|r| r.status() == 201) }
        })
        .await;
        report("deploy", clients, &p);
        ensure!(p.errors == 0, "{} deploys failed", p.errors);
        if clients == 8 {
            figures.push(("deploy", p));
        }
    }
    drop(registry);
    for (name, p) in &figures {
        println!("{name}_rps={:.0}", p.rps());
        println!("{name}_p50_ms={:.2}", p.pct_ms(0.50));
        println!("{name}_p99_ms={:.2}", p.pct_ms(0.99));
    }
    Ok(())
}
