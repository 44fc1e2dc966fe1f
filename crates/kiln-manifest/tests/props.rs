//! Property tests: any valid manifest prints back to itself (with every default written, and with
//! every default left out, which holds the defaults the printer assumes to the parser's), survives
//! the JSON it is stored as, and no input, however broken, makes the parser panic.

use std::collections::BTreeMap;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use kiln_manifest::{
    parse, to_toml, Deploy, Manifest, MaxUnavailable, Metrics, Mount, Process, Restart,
    RestartPolicy, Scale, Secrets, SecretsReload, Service, Strategy as DeployStrategy, Style, Vm,
};
use kiln_types::workload::{CheckKind, CheckSpec, Concurrency, CpuKind};
use kiln_types::{MiB, ServiceProtocol};

const HOUR: u64 = 3_600_000;

fn name() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,8}[a-z0-9])?"
}

fn words() -> impl Strategy<Value = Vec<String>> {
    // Any text, including quotes, backslashes, newlines and non-ASCII; the first word non-empty.
    (".{1,12}", vec(".{0,12}", 0..3))
        .prop_map(|(first, rest)| std::iter::once(first).chain(rest).collect::<Vec<String>>())
}

fn scale() -> impl Strategy<Value = Scale> {
    (0u32..=1000).prop_flat_map(|count| {
        (0..=count, count..=1000).prop_flat_map(move |(min, max)| {
            // Keys are indexes into the app's regions, made names in `manifest()`.
            btree_map("[0-2]", min..=max, 0..3).prop_map(move |regions| Scale {
                count,
                min,
                max,
                regions,
            })
        })
    })
}

fn check(tls_service: bool) -> impl Strategy<Value = CheckSpec> {
    let kind = prop_oneof![
        Just(CheckKind::Tcp),
        ("/[a-z0-9/._-]{0,10}", proptest::option::of(any::<bool>())).prop_map(
            move |(path, tls)| CheckKind::Http {
                path,
                tls: tls.unwrap_or(tls_service)
            }
        ),
        words().prop_map(|command| CheckKind::Exec { command }),
    ];
    (kind, 1_000..=HOUR, 0..=HOUR).prop_flat_map(|(kind, interval_ms, grace_period_ms)| {
        (1..=interval_ms).prop_map(move |timeout_ms| CheckSpec {
            kind: kind.clone(),
            interval_ms,
            timeout_ms,
            grace_period_ms,
        })
    })
}

fn service() -> impl Strategy<Value = Service> {
    any::<bool>().prop_flat_map(|tls| {
        (
            any::<bool>(),
            (1u32..=1_000_000).prop_flat_map(|soft| (Just(soft), soft..=1_000_000)),
            proptest::option::of(vec(check(tls), 1..3)),
            0usize..3,
        )
            .prop_map(move |(proxy_protocol, (soft, hard), checks, n)| Service {
                protocol: if tls {
                    ServiceProtocol::Tls
                } else {
                    ServiceProtocol::Tcp
                },
                // Ports and hostnames are made unique app-wide in `manifest()`.
                internal_port: 0,
                ports: vec![0; if tls { 0 } else { n }],
                hostnames: vec![String::new(); if tls { n } else { 0 }],
                proxy_protocol,
                concurrency: Concurrency {
                    soft_limit: soft,
                    hard_limit: hard,
                },
                checks: checks.unwrap_or_else(|| vec![CheckSpec::default_tcp()]),
            })
    })
}

fn process() -> impl Strategy<Value = Process> {
    (
        proptest::option::of(words()),
        proptest::option::of(words()),
        scale(),
        vec(service(), 0..3),
    )
        .prop_map(|(entrypoint, command, scale, services)| Process {
            name: String::new(),
            entrypoint,
            command,
            scale,
            services,
        })
}

fn duration(max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![0..=max, (0..=max / 1000).prop_map(|s| s * 1000)]
}

fn manifest() -> impl Strategy<Value = Manifest> {
    let head = (
        "[a-z]([a-z0-9-]{0,20}[a-z0-9])?",
        proptest::option::of("[a-z0-9.:/@-]{1,30}"),
        name(),
        vec(name(), 0..3),
        btree_map("[A-Z_][A-Z0-9_]{0,8}", ".{0,20}", 0..4),
        (1u32..=64, any::<bool>(), 1u64..=4096),
    );
    let groups = prop_oneof![
        process().prop_map(|p| vec![Process {
            name: "app".into(),
            ..p
        }]),
        btree_map(name(), process(), 1..4).prop_map(|m| m
            .into_iter()
            .map(|(name, p)| Process { name, ..p })
            .collect()),
    ];
    let tail = (
        vec((name(), 64u64..=16 * 1024 * 1024, any::<u8>()), 0..3),
        (
            prop_oneof![
                Just(DeployStrategy::Rolling),
                Just(DeployStrategy::Canary),
                Just(DeployStrategy::Bluegreen),
                Just(DeployStrategy::Immediate)
            ],
            prop_oneof![
                (1u32..=1000).prop_map(MaxUnavailable::Count),
                (1u8..=100).prop_map(MaxUnavailable::Percent)
            ],
            proptest::option::of(words()),
            1..=24 * HOUR,
            any::<bool>(),
        ),
        any::<bool>(),
        proptest::option::of((1u16..=65535, "/[a-z0-9/_-]{0,10}")),
        (
            prop_oneof![
                Just(RestartPolicy::Always),
                Just(RestartPolicy::OnFailure),
                Just(RestartPolicy::Never)
            ],
            0u32..=1000,
        ),
        0usize..7,
        duration(24 * HOUR),
    );
    (head, groups, tail).prop_map(
        |(
            (app, image, primary, extra_regions, env, (cpus, perf, mem_units)),
            mut processes,
            (mounts, deploy, export_env, metrics, restart, signal, stop_timeout_ms),
        )| {
            let env: BTreeMap<String, String> = env
                .into_iter()
                .filter(|(k, _)| !k.starts_with("KILN_"))
                .collect();
            let mut regions = vec![primary.clone()];
            for r in extra_regions {
                if !regions.contains(&r) {
                    regions.push(r);
                }
            }
            // Ports and hostnames unique where the parser demands it.
            let mut next_port = 10_000u16;
            for (g, p) in processes.iter_mut().enumerate() {
                p.scale.regions = std::mem::take(&mut p.scale.regions)
                    .into_iter()
                    .map(|(i, n)| {
                        let i: usize = i.parse().expect("generated as a digit");
                        (regions[i % regions.len()].clone(), n)
                    })
                    .collect();
                for (i, s) in p.services.iter_mut().enumerate() {
                    s.internal_port = 1 + i as u16;
                    for port in s.ports.iter_mut() {
                        *port = next_port;
                        next_port += 1;
                    }
                    for (h, host) in s.hostnames.iter_mut().enumerate() {
                        *host = format!("h{h}.s{i}.g{g}.example.com");
                    }
                }
            }
            let groups: Vec<String> = processes.iter().map(|p| p.name.clone()).collect();
            let mounts = mounts
                .into_iter()
                .enumerate()
                .map(|(i, (volume, size, pick))| {
                    let mut chosen: Vec<String> = groups
                        .iter()
                        .enumerate()
                        .filter(|(g, _)| pick & (1 << g) != 0)
                        .map(|(_, n)| n.clone())
                        .collect();
                    if chosen.is_empty() {
                        chosen = groups.clone();
                    }
                    Mount {
                        volume: format!("{volume}{i}"),
                        path: format!("/data/{i}"),
                        initial_size: MiB(size),
                        processes: chosen,
                    }
                })
                .collect();
            let (strategy, max_unavailable, release_command, health_timeout_ms, auto_rollback) =
                deploy;
            Manifest {
                app: app.parse().expect("generated app names are valid"),
                image,
                primary_region: primary,
                regions,
                env,
                vm: Vm {
                    cpus,
                    cpu_kind: if perf {
                        CpuKind::Performance
                    } else {
                        CpuKind::Shared
                    },
                    memory: MiB(mem_units * 64),
                    read_only_root: perf,
                },
                processes,
                mounts,
                deploy: Deploy {
                    strategy,
                    max_unavailable,
                    release_command,
                    health_timeout_ms,
                    auto_rollback,
                },
                // Both reload modes are covered without another generator: tie it to export_env.
                secrets: Secrets {
                    export_env,
                    reload: if export_env {
                        SecretsReload::Signal
                    } else {
                        SecretsReload::Restart
                    },
                },
                metrics: metrics.map(|(port, path)| Metrics { port, path }),
                restart: Restart {
                    policy: restart.0,
                    max_retries: restart.1,
                },
                stop_signal: [
                    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL",
                ][signal]
                    .to_owned(),
                stop_timeout_ms,
            }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn resolved_printing_round_trips(m in manifest()) {
        let text = to_toml(&m, Style::Resolved);
        let back = parse("resolved.toml", &text).map_err(|e| TestCaseError::fail(format!("{}\n{text}", e.report())))?;
        prop_assert_eq!(back, m);
    }

    #[test]
    fn leaving_out_defaults_round_trips(m in manifest()) {
        let text = to_toml(&m, Style::Minimal);
        let back = parse("minimal.toml", &text).map_err(|e| TestCaseError::fail(format!("{}\n{text}", e.report())))?;
        prop_assert_eq!(back, m);
    }

    #[test]
    fn stored_json_round_trips(m in manifest()) {
        let json = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn any_text_is_answered_without_panic(src in "\\PC{0,400}") {
        let _ = parse("any.toml", &src);
    }

    #[test]
    fn damaged_manifests_are_answered_without_panic(
        m in manifest(),
        cuts in vec((any::<prop::sample::Index>(), 0usize..40, "[\\[\\]=\"'{},.#\\n a-z0-9]{0,8}"), 1..4),
    ) {
        let mut text = to_toml(&m, Style::Resolved).into_bytes();
        for (at, len, insert) in cuts {
            let start = at.index(text.len().max(1)).min(text.len());
            let end = (start + len).min(text.len());
            text.splice(start..end, insert.bytes());
        }
        let text = String::from_utf8_lossy(&text);
        if let Ok(m) = parse("damaged.toml", &text) {
            // Whatever it accepted is a manifest like any other.
            let again = parse("again.toml", &to_toml(&m, Style::Minimal));
            prop_assert_eq!(again.ok(), Some(m));
        } else if let Err(e) = parse("damaged.toml", &text) {
            prop_assert!(!e.problems.is_empty());
        }
    }
}
