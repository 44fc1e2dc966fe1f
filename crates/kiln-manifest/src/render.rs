//! A [`Manifest`] printed back as `kiln.toml`.
//!
//! [`Style::Resolved`] writes every key with its value, defaults included, and always spells out
//! process groups as `[processes.<name>]`: it is what `kiln config show --resolved` prints.
//! [`Style::Minimal`] leaves out every key whose value is its default. Both parse back to the same
//! manifest (property-tested), which is how the tests hold the documented defaults to the code.

use kiln_types::workload::{CheckKind, CheckSpec, Concurrency, CpuKind};
use kiln_types::ServiceProtocol;

use crate::model::{Manifest, MaxUnavailable, Process, Restart, Scale, Service};
use crate::{defaults, text};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Every key, defaults included.
    Resolved,
    /// Only keys whose value differs from the default.
    Minimal,
}

struct W {
    out: String,
    full: bool,
}

fn s(v: &str) -> String {
    toml::Value::String(v.to_owned()).to_string()
}

fn list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|i| s(i)).collect();
    format!("[{}]", inner.join(", "))
}

impl W {
    fn kv(&mut self, key: &str, value: impl std::fmt::Display) {
        self.out.push_str(&format!("{key} = {value}\n"));
    }

    /// Writes `key = value` unless the style is minimal and the value is the default.
    fn kv_unless<T: PartialEq + std::fmt::Display>(&mut self, key: &str, value: T, default: T) {
        if self.full || value != default {
            self.kv(key, value);
        }
    }

    fn header(&mut self, h: &str) {
        if !self.out.is_empty() {
            self.out.push('\n');
        }
        self.out.push_str(h);
        self.out.push('\n');
    }

    /// Writes a `[name]` table from `(key, value, is_default)` rows, or nothing when minimal and
    /// every row is a default.
    fn table(&mut self, name: &str, rows: &[(&str, String, bool)]) {
        let rows: Vec<_> = rows.iter().filter(|r| self.full || !r.2).collect();
        if rows.is_empty() {
            return;
        }
        self.header(&format!("[{name}]"));
        for (k, v, _) in rows {
            self.kv(k, v);
        }
    }
}

/// Prints `m` as a `kiln.toml` that parses back to `m`.
pub fn to_toml(m: &Manifest, style: Style) -> String {
    let mut w = W {
        out: String::new(),
        full: style == Style::Resolved,
    };
    w.kv("app", s(m.app.as_str()));
    if let Some(image) = &m.image {
        w.kv("image", s(image));
    }
    w.kv_unless(
        "primary_region",
        s(&m.primary_region),
        s(defaults::PRIMARY_REGION),
    );
    w.kv_unless(
        "regions",
        list(&m.regions),
        list(std::slice::from_ref(&m.primary_region)),
    );
    w.kv_unless("stop_signal", s(&m.stop_signal), s(defaults::STOP_SIGNAL));
    w.kv_unless(
        "stop_timeout",
        s(&text::format_duration(m.stop_timeout_ms)),
        s(&text::format_duration(defaults::STOP_TIMEOUT_MS)),
    );

    // A single group named `app` is written the way a user would write it, at the top level.
    let top_level_group =
        !w.full && m.processes.len() == 1 && m.processes[0].name == defaults::PROCESS;
    if top_level_group {
        let p = &m.processes[0];
        if let Some(e) = &p.entrypoint {
            w.kv("entrypoint", list(e));
        }
        if let Some(c) = &p.command {
            w.kv("command", list(c));
        }
    }

    if !m.env.is_empty() {
        w.header("[env]");
        for (k, v) in &m.env {
            w.kv(k, s(v));
        }
    }

    w.table(
        "vm",
        &[
            ("cpus", m.vm.cpus.to_string(), m.vm.cpus == defaults::CPUS),
            (
                "cpu_kind",
                s(m.vm.cpu_kind.as_str()),
                m.vm.cpu_kind == CpuKind::Shared,
            ),
            (
                "memory_mib",
                m.vm.memory.0.to_string(),
                m.vm.memory.0 == defaults::MEMORY_MIB,
            ),
            (
                "read_only_root",
                m.vm.read_only_root.to_string(),
                !m.vm.read_only_root,
            ),
        ],
    );

    if top_level_group {
        let p = &m.processes[0];
        scale(&mut w, "scale", &p.scale);
        for svc in &p.services {
            service(&mut w, "services", svc);
        }
    } else {
        for p in &m.processes {
            group(&mut w, p);
        }
    }

    let all_groups: Vec<String> = m.processes.iter().map(|p| p.name.clone()).collect();
    for mount in &m.mounts {
        w.header("[[mounts]]");
        w.kv("volume", s(&mount.volume));
        w.kv("path", s(&mount.path));
        w.kv_unless(
            "initial_size",
            s(&text::format_size_mib(mount.initial_size.0)),
            s(&text::format_size_mib(defaults::VOLUME_SIZE_MIB)),
        );
        w.kv_unless("processes", list(&mount.processes), list(&all_groups));
    }

    let d = &m.deploy;
    let mut rows = vec![
        (
            "strategy",
            s(d.strategy.as_str()),
            d.strategy == Default::default(),
        ),
        (
            "max_unavailable",
            match d.max_unavailable {
                MaxUnavailable::Count(n) => n.to_string(),
                MaxUnavailable::Percent(p) => s(&format!("{p}%")),
            },
            d.max_unavailable == MaxUnavailable::default(),
        ),
    ];
    if let Some(c) = &d.release_command {
        rows.push(("release_command", list(c), false));
    }
    rows.push((
        "health_timeout",
        s(&text::format_duration(d.health_timeout_ms)),
        d.health_timeout_ms == defaults::HEALTH_TIMEOUT_MS,
    ));
    rows.push((
        "auto_rollback",
        d.auto_rollback.to_string(),
        d.auto_rollback,
    ));
    w.table("deploy", &rows);

    w.table(
        "secrets",
        &[
            (
                "export_env",
                m.secrets.export_env.to_string(),
                !m.secrets.export_env,
            ),
            (
                "reload",
                s(m.secrets.reload.as_str()),
                m.secrets.reload == crate::SecretsReload::Restart,
            ),
        ],
    );
    if let Some(metrics) = &m.metrics {
        w.header("[metrics]");
        w.kv("port", metrics.port);
        w.kv_unless("path", s(&metrics.path), s("/metrics"));
    }
    w.table(
        "restart",
        &[
            (
                "policy",
                s(m.restart.policy.as_str()),
                m.restart.policy == Restart::default().policy,
            ),
            (
                "max_retries",
                m.restart.max_retries.to_string(),
                m.restart.max_retries == defaults::MAX_RETRIES,
            ),
        ],
    );
    w.out
}

fn scale(w: &mut W, name: &str, sc: &Scale) {
    let regions = sc
        .regions
        .iter()
        .map(|(r, n)| format!("{r} = {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    w.table(
        name,
        &[
            ("count", sc.count.to_string(), sc.count == defaults::COUNT),
            ("min", sc.min.to_string(), sc.min == sc.count),
            ("max", sc.max.to_string(), sc.max == sc.count),
            (
                "regions",
                if regions.is_empty() {
                    "{}".to_owned()
                } else {
                    format!("{{ {regions} }}")
                },
                sc.regions.is_empty(),
            ),
        ],
    );
}

fn group(w: &mut W, p: &Process) {
    let base = format!("processes.{}", p.name);
    w.header(&format!("[{base}]"));
    if let Some(e) = &p.entrypoint {
        w.kv("entrypoint", list(e));
    }
    if let Some(c) = &p.command {
        w.kv("command", list(c));
    }
    scale(w, &format!("{base}.scale"), &p.scale);
    for svc in &p.services {
        service(w, &format!("{base}.services"), svc);
    }
}

fn service(w: &mut W, base: &str, svc: &Service) {
    w.header(&format!("[[{base}]]"));
    w.kv("protocol", s(svc.protocol.as_str()));
    w.kv("internal_port", svc.internal_port);
    match svc.protocol {
        ServiceProtocol::Tcp if w.full || !svc.ports.is_empty() => {
            let ports: Vec<String> = svc.ports.iter().map(u16::to_string).collect();
            w.kv("ports", format!("[{}]", ports.join(", ")));
        }
        ServiceProtocol::Tls if w.full || !svc.hostnames.is_empty() => {
            w.kv("hostnames", list(&svc.hostnames));
        }
        _ => {}
    }
    w.kv_unless("proxy_protocol", svc.proxy_protocol, false);
    let c = svc.concurrency;
    let dc = Concurrency::default();
    w.table(
        &format!("{base}.concurrency"),
        &[
            (
                "soft_limit",
                c.soft_limit.to_string(),
                c.soft_limit == dc.soft_limit,
            ),
            (
                "hard_limit",
                c.hard_limit.to_string(),
                c.hard_limit == dc.hard_limit,
            ),
        ],
    );
    if !w.full && svc.checks == [CheckSpec::default_tcp()] {
        return;
    }
    for check in &svc.checks {
        w.header(&format!("[[{base}.checks]]"));
        w.kv("kind", s(check.kind.as_str()));
        match &check.kind {
            CheckKind::Tcp => {}
            CheckKind::Http { path, tls } => {
                w.kv_unless("path", s(path), s("/"));
                w.kv_unless("tls", *tls, svc.protocol == ServiceProtocol::Tls);
            }
            CheckKind::Exec { command } => w.kv("command", list(command)),
        }
        let dflt = CheckSpec::default_tcp();
        for (key, ms, default) in [
            ("interval", check.interval_ms, dflt.interval_ms),
            ("timeout", check.timeout_ms, dflt.timeout_ms),
            ("grace_period", check.grace_period_ms, dflt.grace_period_ms),
        ] {
            w.kv_unless(
                key,
                s(&text::format_duration(ms)),
                s(&text::format_duration(default)),
            );
        }
    }
}
