//! `./scripts/bench store`: the event log on both backends.
//!
//! For SQLite (a temp file) and Postgres (a throwaway cluster with default, durable settings:
//! `fsync` and `synchronous_commit` on):
//! - appends per second for 1, 8, 64 and 256 concurrent writers; every append is one
//!   `instance_state_changed` event with an `Exact` expected version and its own idempotency
//!   key, and each writer waits for its append before sending the next one; then events per
//!   second for 8 and 64 writers whose appends carry 16 state changes each, and 64 writers with
//!   64 each (an append is
//!   atomic, so its events share one key: a reconciler reporting many instances at once), and
//!   for 64 writers whose appends each place 16 new instances (a deploy: full WorkloadSpecs,
//!   `NoStream` expected, one key per append);
//! - a log of 1,000,000 events (apps, releases, placements with full WorkloadSpecs, state
//!   changes) and the time to rebuild every view from it (`rebuild_views`: replay into fresh
//!   tables + checksums of both sides), which must find them equal;
//! - the peak resident memory of this process during each phase (Linux `VmHWM`, reset between
//!   phases through `/proc/self/clear_refs`). The Postgres server's own memory is not counted.
//!
//! Ends with `backend=<name> appends_per_sec=<n>` for each backend (the 8-writer figure).
//! `KILN_BENCH_STORE_EVENTS` overrides the size of the rebuild log (default 1,000,000);
//! `KILN_BENCH_STORE_BACKENDS=postgres` (or `sqlite`) runs one backend only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use kiln_store::{
    Append, ExpectedVersion, Idempotency, Location, Metadata, NewEvent, Options, Store,
};
use kiln_types::event::{Event, ReleaseState};
use kiln_types::{
    AppId, HostId, ImageRef, InstanceId, InstanceState, OrgId, ReleaseId, WorkloadSpec,
};

use crate::postgres::PostgresCluster;

const SPEC_1_0: &str = include_str!("../../../kiln-types/tests/golden/workload-spec-1.0.json");

fn spec(app: &AppId, release: &ReleaseId, instance: &InstanceId) -> Result<WorkloadSpec> {
    let mut v: serde_json::Value = serde_json::from_str(SPEC_1_0)?;
    v["instance_id"] = instance.to_string().into();
    v["app_id"] = app.to_string().into();
    v["release_id"] = release.to_string().into();
    Ok(serde_json::from_value(v)?)
}

fn meta() -> Metadata {
    Metadata {
        actor: "system:bench".into(),
        request_id: Some("bench".into()),
        ..Default::default()
    }
}

/// Peak resident set of this process since the last reset, in MiB.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

fn reset_peak_rss() {
    // "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One writer's instances and their stream versions.
struct Writer {
    app: AppId,
    instances: Vec<(InstanceId, u64)>,
}

/// Places `per_writer` instances for each of `writers` writers; returns their streams.
async fn setup_writers(store: &Store, writers: usize, per_writer: usize) -> Result<Vec<Writer>> {
    let host = HostId::generate();
    let mut out = Vec::new();
    for _ in 0..writers {
        let app = AppId::generate();
        let release = ReleaseId::generate();
        let mut events = Vec::new();
        let mut instances = Vec::new();
        for _ in 0..per_writer {
            let id = InstanceId::generate();
            events.push(NewEvent {
                event: Event::InstancePlaced {
                    host_id: host.clone(),
                    spec: spec(&app, &release, &id)?,
                },
                expected: ExpectedVersion::NoStream,
            });
            instances.push((id, 1));
        }
        store
            .append(Append {
                events,
                metadata: meta(),
                idempotency: None,
            })
            .await?;
        out.push(Writer { app, instances });
    }
    Ok(out)
}

/// `writers` concurrent writers, each appending `per_writer` appends one after another.
async fn append_phase(
    store: &Store,
    phase: &str,
    writers: usize,
    per_writer: usize,
    events_per_append: usize,
) -> Result<(f64, Duration)> {
    let setup = setup_writers(store, writers, events_per_append.max(4)).await?;
    reset_peak_rss();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (w, mut writer) in setup.into_iter().enumerate() {
        let store = store.clone();
        let phase = phase.to_owned();
        tasks.push(tokio::spawn(async move {
            for n in 0..per_writer {
                // Each append changes `events_per_append` different instances of the writer.
                let picks: Vec<usize> = (0..events_per_append)
                    .map(|k| (n * events_per_append + k) % writer.instances.len())
                    .collect();
                let key = format!("{phase}-{w}-{n}");
                let events = picks
                    .iter()
                    .map(|&i| NewEvent {
                        event: Event::InstanceStateChanged {
                            instance_id: writer.instances[i].0.clone(),
                            app_id: writer.app.clone(),
                            state: if n % 2 == 0 {
                                InstanceState::Healthy
                            } else {
                                InstanceState::Unhealthy
                            },
                            reason: None,
                        },
                        expected: ExpectedVersion::Exact(writer.instances[i].1),
                    })
                    .collect();
                let out = store
                    .append(Append {
                        events,
                        metadata: meta(),
                        idempotency: Some(Idempotency {
                            scope: "bench".into(),
                            request_hash: key.clone(),
                            key,
                        }),
                    })
                    .await?;
                anyhow::ensure!(!out.replayed, "a fresh key was replayed");
                for (&i, e) in picks.iter().zip(&out.events) {
                    writer.instances[i].1 = e.stream_version;
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    let total = (writers * per_writer * events_per_append) as f64;
    Ok((total / elapsed.as_secs_f64(), elapsed))
}

/// `writers` concurrent deployers, each appending `per_writer` appends of `per_append`
/// placements of a new release (every append with its own idempotency key).
async fn deploy_phase(
    store: &Store,
    writers: usize,
    per_writer: usize,
    per_append: usize,
) -> Result<(f64, Duration)> {
    let host = HostId::generate();
    reset_peak_rss();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..per_writer {
                let app = AppId::generate();
                let release = ReleaseId::generate();
                let mut events = Vec::with_capacity(per_append);
                for _ in 0..per_append {
                    events.push(NewEvent {
                        event: Event::InstancePlaced {
                            host_id: host.clone(),
                            spec: spec(&app, &release, &InstanceId::generate())?,
                        },
                        expected: ExpectedVersion::NoStream,
                    });
                }
                let key = format!("deploy-{w}-{n}");
                let out = store
                    .append(Append {
                        events,
                        metadata: meta(),
                        idempotency: Some(Idempotency {
                            scope: "bench".into(),
                            request_hash: key.clone(),
                            key,
                        }),
                    })
                    .await?;
                anyhow::ensure!(!out.replayed, "a fresh key was replayed");
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    let total = (writers * per_writer * per_append) as f64;
    Ok((total / elapsed.as_secs_f64(), elapsed))
}

/// One app's history: 100 events.
fn app_history(org: &OrgId, host: &HostId, n: usize) -> Result<Vec<NewEvent>> {
    let app = AppId::generate();
    let release = ReleaseId::generate();
    let mut ev = vec![
        Event::AppCreated {
            app_id: app.clone(),
            org_id: org.clone(),
            name: format!("app-{n}").parse().context("app name")?,
        },
        Event::ReleaseCreated {
            app_id: app.clone(),
            release_id: release.clone(),
            version: 1,
            image_input: "bench:latest".into(),
            image: ImageRef {
                registry: "127.0.0.1:5000".into(),
                repository: "bench".into(),
                digest: format!("sha256:{}", "0".repeat(64)),
            },
            manifest: serde_json::json!({"app": format!("app-{n}")}),
            manifest_source: format!("app = \"app-{n}\"\n"),
            secrets_version: 0,
        },
    ];
    let instances: Vec<InstanceId> = (0..5).map(|_| InstanceId::generate()).collect();
    for id in &instances {
        ev.push(Event::InstancePlaced {
            host_id: host.clone(),
            spec: spec(&app, &release, id)?,
        });
    }
    let states = [
        InstanceState::Starting,
        InstanceState::Healthy,
        InstanceState::Unhealthy,
        InstanceState::Healthy,
    ];
    for i in 0..92 {
        ev.push(Event::InstanceStateChanged {
            instance_id: instances[i % 5].clone(),
            app_id: app.clone(),
            state: states[(i / 5) % states.len()],
            reason: None,
        });
    }
    ev.push(Event::ReleaseStateChanged {
        app_id: app,
        release_id: release,
        state: ReleaseState::Healthy,
        reason: None,
    });
    Ok(ev.into_iter().map(NewEvent::any).collect())
}

/// Appends `events` events (in apps of 100), 8 appenders at a time.
async fn fill(store: &Store, events: usize) -> Result<Duration> {
    let org = OrgId::generate();
    let host = HostId::generate();
    store
        .append(Append {
            events: vec![NewEvent::any(Event::OrgCreated {
                org_id: org.clone(),
                name: "bench".into(),
            })],
            metadata: meta(),
            idempotency: None,
        })
        .await?;
    let apps = events / 100;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let next = next.clone();
        let org = org.clone();
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= apps {
                    return Ok::<(), anyhow::Error>(());
                }
                store
                    .append(Append {
                        events: app_history(&org, &host, n)?,
                        metadata: meta(),
                        idempotency: None,
                    })
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

struct Figures {
    backend: &'static str,
    one: f64,
    eight: f64,
    many: f64,
    crowd: f64,
    /// Events per second, 8 writers, 16 events per append.
    eight_multi: f64,
    /// Events per second, 64 writers, 16 state changes per append.
    many_multi: f64,
    /// Events per second, 64 writers, 64 state changes per append.
    many_large: f64,
    /// Events per second, 64 writers, 16 placements per append.
    deploy: f64,
}

async fn bench_backend(
    backend: &'static str,
    location: Location,
    events: usize,
) -> Result<Figures> {
    let store = Store::open(&location, Options::default()).await?;
    println!("== {backend}: appends with idempotency keys and Exact expected versions");
    let phase = |name: &'static str, writers: usize, per_writer: usize, per_append: usize| {
        let store = store.clone();
        async move {
            let (rate, d) = append_phase(&store, name, writers, per_writer, per_append).await?;
            println!(
                "backend={backend} writers={writers} events_per_append={per_append} appends={} seconds={:.2} events_per_sec={rate:.0} appends_per_sec={:.0} peak_rss_mib={}",
                writers * per_writer,
                d.as_secs_f64(),
                rate / per_append as f64,
                peak_rss_mib()
            );
            Ok::<f64, anyhow::Error>(rate / per_append as f64)
        }
    };
    let one = phase("one", 1, 2_000, 1).await?;
    let eight = phase("eight", 8, 2_500, 1).await?;
    let many = phase("many", 64, 500, 1).await?;
    let crowd = phase("crowd", 256, 125, 1).await?;
    let eight_multi = phase("multi", 8, 500, 16).await? * 16.0;
    let many_multi = phase("reconcile", 64, 100, 16).await? * 16.0;
    let many_large = phase("reconcile64", 64, 25, 64).await? * 64.0;
    let (deploy, d) = deploy_phase(&store, 64, 40, 16).await?;
    println!(
        "backend={backend} phase=deploy writers=64 events_per_append=16 appends={} seconds={:.2} events_per_sec={deploy:.0} appends_per_sec={:.0} peak_rss_mib={}",
        64 * 40,
        d.as_secs_f64(),
        deploy / 16.0,
        peak_rss_mib()
    );
    println!("== {backend}: rebuild of {events} events");
    let already = store.head() as usize;
    reset_peak_rss();
    let filled = fill(&store, events.saturating_sub(already)).await?;
    println!(
        "backend={backend} fill_events={} fill_seconds={:.1} fill_events_per_sec={:.0} peak_rss_mib={}",
        store.head() as usize - already,
        filled.as_secs_f64(),
        (store.head() as usize - already) as f64 / filled.as_secs_f64(),
        peak_rss_mib()
    );
    reset_peak_rss();
    let report = store.rebuild_views(false).await?;
    ensure!(
        report.is_equal(),
        "rebuilt views differ from the live ones: {report:?}"
    );
    println!(
        "backend={backend} rebuild_events={} rebuild_seconds={:.1} rebuild_events_per_sec={:.0} views_equal={} peak_rss_mib={}",
        report.events,
        report.elapsed.as_secs_f64(),
        report.events as f64 / report.elapsed.as_secs_f64(),
        report.is_equal(),
        peak_rss_mib()
    );
    Ok(Figures {
        backend,
        one,
        eight,
        many,
        crowd,
        eight_multi,
        many_multi,
        many_large,
        deploy,
    })
}

pub async fn run() -> Result<()> {
    let events: usize = std::env::var("KILN_BENCH_STORE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // `KILN_BENCH_STORE_BACKENDS=postgres` (or `sqlite`) runs one backend only.
    let only = std::env::var("KILN_BENCH_STORE_BACKENDS").unwrap_or_default();
    let wants = |b: &str| only.is_empty() || only.split(',').any(|o| o == b);
    let mut figures = Vec::new();
    let dir = tempfile::tempdir()?;
    if wants("sqlite") {
        figures.push(
            bench_backend(
                "sqlite",
                Location::Sqlite(dir.path().join("kiln.db")),
                events,
            )
            .await?,
        );
    }
    if wants("postgres") {
        figures.push(bench_postgres(events).await?);
    }
    println!("== summary (appends per second with one event each; events per second with 16)");
    for f in &figures {
        println!(
            "backend={} writers_1={:.0} writers_8={:.0} writers_64={:.0} writers_256={:.0} writers_8_events_per_sec_16_per_append={:.0} writers_64_events_per_sec_16_per_append={:.0} writers_64_events_per_sec_64_per_append={:.0} deploy_events_per_sec={:.0}",
            f.backend, f.one, f.eight, f.many, f.crowd, f.eight_multi, f.many_multi, f.many_large, f.deploy
        );
    }
    for f in &figures {
        println!("backend={} appends_per_sec={:.0}", f.backend, f.eight);
    }
    Ok(())
}

async fn bench_postgres(events: usize) -> Result<Figures> {
    // Extra server settings for experiments, e.g. `log_min_duration_statement=5`; the figures in
    // the docs use none (defaults: fsync and synchronous_commit on).
    let settings: Vec<String> = std::env::var("KILN_BENCH_PG_SETTINGS")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let pg = tokio::task::spawn_blocking(move || {
        let s: Vec<&str> = settings.iter().map(String::as_str).collect();
        PostgresCluster::start_with(&s)
    })
    .await??;
    let url = pg.create_database("kiln")?;
    let postgres = bench_backend("postgres", Location::Postgres(url), events).await;
    if let Ok(path) = std::env::var("KILN_BENCH_PG_LOG") {
        std::fs::write(&path, pg.log())?;
    }
    postgres
}
