//! From a TOML document with spans to a [`Manifest`], collecting every problem on the way.
//!
//! The walk never stops at the first problem: a bad value is reported and replaced by its default
//! so that the rest of the file is still checked. Each problem is anchored to the span of the key
//! or value it is about (a missing key to its table's header).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use kiln_types::workload::{CheckKind, CheckSpec, Concurrency, CpuKind};
use kiln_types::{AppName, MiB, ServiceProtocol};

use crate::model::{
    Deploy, Manifest, MaxUnavailable, Metrics, Mount, Process, Restart, RestartPolicy, Scale,
    Secrets, SecretsReload, Service, Strategy, Vm,
};
use crate::schema::{self, Field, Table, Ty};
use crate::text;
use crate::{defaults, MAX_DURATION_MS};

type Span = Range<usize>;
type Value<'i> = Spanned<DeValue<'i>>;

/// Problems found so far, each with the byte span it is about.
pub(crate) struct Cx {
    pub problems: Vec<(Span, String)>,
}

impl Cx {
    fn err(&mut self, span: Span, message: impl Into<String>) {
        self.problems.push((span, message.into()));
    }
}

/// An opened table: its path for messages, its header span, its entries and its schema.
struct Tbl<'a, 'i> {
    path: String,
    span: Span,
    map: &'a DeTable<'i>,
    schema: &'static Table,
}

impl<'a, 'i> Tbl<'a, 'i> {
    fn get(&self, key: &str) -> Option<&'a Value<'i>> {
        self.map
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(_, v)| v)
    }

    fn key_span(&self, key: &str) -> Span {
        self.map
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(k, _)| k.span())
            .unwrap_or_else(|| self.span.clone())
    }

    /// `path.key`, the name used in messages.
    fn kp(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn field(&self, key: &str) -> &'static Field {
        static UNKNOWN: Field = Field {
            name: "?",
            ty: Ty::Str,
            required: false,
            default: None,
            doc: "",
        };
        self.schema.field(key).unwrap_or_else(|| {
            debug_assert!(false, "key `{key}` is read but missing from the schema");
            &UNKNOWN
        })
    }

    fn expected(&self, key: &str) -> String {
        self.field(key).ty.expected()
    }
}

fn where_(path: &str) -> String {
    if path.is_empty() {
        "at the top level".into()
    } else {
        format!("in `{path}`")
    }
}

fn found(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("{:?}", truncate(s)),
        DeValue::Integer(i) => format!("{i}"),
        DeValue::Float(f) => format!("{f}"),
        DeValue::Boolean(b) => format!("{b}"),
        DeValue::Datetime(d) => format!("the date-time {d}"),
        DeValue::Array(_) => "an array".into(),
        DeValue::Table(_) => "a table".into(),
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s.to_owned()
    }
}

fn int_of(v: &DeValue<'_>) -> Option<Option<i64>> {
    match v {
        DeValue::Integer(i) => Some(i64::from_str_radix(i.as_str(), i.radix()).ok()),
        _ => None,
    }
}

impl Cx {
    /// Opens `v` as a table described by `schema`, reporting unknown keys.
    fn open<'a, 'i>(
        &mut self,
        path: String,
        v: &'a Value<'i>,
        schema: &'static Table,
    ) -> Option<Tbl<'a, 'i>> {
        match v.get_ref() {
            DeValue::Table(map) => Some(self.open_map(path, v.span(), map, schema)),
            other => {
                self.err(
                    v.span(),
                    format!("`{path}`: expected a table, found {}", found(other)),
                );
                None
            }
        }
    }

    fn open_map<'a, 'i>(
        &mut self,
        path: String,
        span: Span,
        map: &'a DeTable<'i>,
        schema: &'static Table,
    ) -> Tbl<'a, 'i> {
        for (k, _) in map.iter() {
            let key = k.get_ref().as_ref();
            if schema.field(key).is_some() {
                continue;
            }
            let mut msg = format!("unknown key `{key}` {}", where_(&path));
            if let Some(s) = text::suggest(key, schema.fields.iter().map(|f| f.name)) {
                msg.push_str(&format!("; did you mean `{s}`?"));
            } else if let Some(s) = nested_suggestion(key, schema) {
                msg.push_str(&format!("; did you mean `{s}`?"));
            } else {
                let names: Vec<&str> = schema.fields.iter().map(|f| f.name).collect();
                msg.push_str(&format!("; expected one of: {}", names.join(", ")));
            }
            self.err(k.span(), msg);
        }
        Tbl {
            path,
            span,
            map,
            schema,
        }
    }

    fn require(&mut self, t: &Tbl<'_, '_>, key: &str) -> bool {
        if t.get(key).is_some() {
            return true;
        }
        self.err(
            t.span.clone(),
            format!(
                "missing key `{key}` {}: expected {}",
                where_(&t.path),
                t.expected(key)
            ),
        );
        false
    }

    fn mismatch(&mut self, t: &Tbl<'_, '_>, key: &str, v: &Value<'_>) {
        self.err(
            v.span(),
            format!(
                "`{}`: expected {}, found {}",
                t.kp(key),
                t.expected(key),
                found(v.get_ref())
            ),
        );
    }

    fn str<'a>(&mut self, t: &Tbl<'a, '_>, key: &str) -> Option<(&'a str, Span)> {
        let v = t.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some((s.as_ref(), v.span())),
            _ => {
                self.mismatch(t, key, v);
                None
            }
        }
    }

    fn bool(&mut self, t: &Tbl<'_, '_>, key: &str) -> Option<bool> {
        let v = t.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.mismatch(t, key, v);
                None
            }
        }
    }

    /// An integer within the range (and step) of the key's schema type.
    fn int(&mut self, t: &Tbl<'_, '_>, key: &str) -> Option<(i64, Span)> {
        let v = t.get(key)?;
        let (min, max, step) = match t.field(key).ty {
            Ty::Int { min, max } => (min, max, 1),
            Ty::IntStep { min, max, step } => (min, max, step),
            _ => (i64::MIN, i64::MAX, 1),
        };
        match int_of(v.get_ref()) {
            Some(Some(n)) if (min..=max).contains(&n) && n % step == 0 => Some((n, v.span())),
            Some(_) | None => {
                self.mismatch(t, key, v);
                None
            }
        }
    }

    fn name(&mut self, t: &Tbl<'_, '_>, key: &str) -> Option<(String, Span)> {
        let (s, span) = self.str(t, key)?;
        match kiln_types::name::check_dns_label(s, 63) {
            Ok(()) => Some((s.to_owned(), span)),
            Err(e) => {
                self.err(span, format!("`{}`: {e}", t.kp(key)));
                None
            }
        }
    }

    fn enumv(&mut self, t: &Tbl<'_, '_>, key: &str) -> Option<&'static str> {
        let Ty::Enum(values) = t.field(key).ty else {
            return None;
        };
        let v = t.get(key)?;
        if let DeValue::String(s) = v.get_ref() {
            if let Some(known) = values.iter().find(|x| **x == s.as_ref()) {
                return Some(known);
            }
            let mut msg = format!(
                "`{}`: expected one of {}, found {:?}",
                t.kp(key),
                schema::quoted(values),
                truncate(s)
            );
            if let Some(sug) = text::suggest(s, values.iter().copied()) {
                msg.push_str(&format!("; did you mean {sug:?}?"));
            }
            self.err(v.span(), msg);
            return None;
        }
        self.mismatch(t, key, v);
        None
    }

    /// A duration in milliseconds, between `min_ms` and `max_ms`.
    fn duration(&mut self, t: &Tbl<'_, '_>, key: &str, min_ms: u64, max_ms: u64) -> Option<u64> {
        let (s, span) = self.str(t, key)?;
        let Some(d) = text::parse_duration(s) else {
            self.err(
                span,
                format!(
                    "`{}`: expected {}, found {:?}",
                    t.kp(key),
                    t.expected(key),
                    truncate(s)
                ),
            );
            return None;
        };
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if ms < min_ms || ms > max_ms {
            self.err(
                span,
                format!(
                    "`{}`: expected a duration from {} to {}, found {s:?}",
                    t.kp(key),
                    text::format_duration(min_ms),
                    text::format_duration(max_ms)
                ),
            );
            return None;
        }
        Some(ms)
    }

    fn command(&mut self, t: &Tbl<'_, '_>, key: &str) -> Option<Vec<String>> {
        let v = t.get(key)?;
        let words = match v.get_ref() {
            DeValue::String(s) => match text::split_command(s) {
                Some(w) => w,
                None => {
                    self.err(
                        v.span(),
                        format!(
                            "`{}`: unterminated quote or trailing backslash in {:?}; or write the command as an array of strings",
                            t.kp(key),
                            truncate(s)
                        ),
                    );
                    return None;
                }
            },
            DeValue::Array(items) => {
                let mut words = Vec::new();
                for item in items.iter() {
                    match item.get_ref() {
                        DeValue::String(s) => words.push(s.to_string()),
                        other => {
                            self.err(
                                item.span(),
                                format!(
                                    "`{}`: expected every argument to be a string, found {}",
                                    t.kp(key),
                                    found(other)
                                ),
                            );
                            return None;
                        }
                    }
                }
                words
            }
            _ => {
                self.mismatch(t, key, v);
                return None;
            }
        };
        if words.is_empty() || words[0].is_empty() {
            self.err(
                v.span(),
                format!(
                    "`{}`: expected a command, found an empty one; omit the key to use the image's",
                    t.kp(key)
                ),
            );
            return None;
        }
        Some(words)
    }

    /// An array of strings, each with its span.
    fn strings<'a>(&mut self, t: &Tbl<'a, '_>, key: &str) -> Option<Vec<(&'a str, Span)>> {
        let v = t.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.mismatch(t, key, v);
            return None;
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push((s.as_ref(), item.span())),
                other => self.err(
                    item.span(),
                    format!(
                        "`{}`: expected {}, found {} in it",
                        t.kp(key),
                        t.expected(key),
                        found(other)
                    ),
                ),
            }
        }
        Some(out)
    }

    /// An array of DNS labels, without duplicates.
    fn names(&mut self, t: &Tbl<'_, '_>, key: &str) -> Option<Vec<(String, Span)>> {
        let items = self.strings(t, key)?;
        let mut out: Vec<(String, Span)> = Vec::new();
        for (s, span) in items {
            if let Err(e) = kiln_types::name::check_dns_label(s, 63) {
                self.err(span, format!("`{}`: {e}", t.kp(key)));
            } else if out.iter().any(|(o, _)| o == s) {
                self.err(span, format!("`{}`: {s:?} is listed twice", t.kp(key)));
            } else {
                out.push((s.to_owned(), span));
            }
        }
        Some(out)
    }

    fn ports(&mut self, t: &Tbl<'_, '_>, key: &str) -> Option<Vec<(u16, Span)>> {
        let v = t.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.mismatch(t, key, v);
            return None;
        };
        let mut out: Vec<(u16, Span)> = Vec::new();
        for item in items.iter() {
            match int_of(item.get_ref()) {
                Some(Some(n)) if (1..=65535).contains(&n) => {
                    let port = n as u16;
                    if out.iter().any(|(p, _)| *p == port) {
                        self.err(
                            item.span(),
                            format!("`{}`: port {port} is listed twice", t.kp(key)),
                        );
                    } else {
                        out.push((port, item.span()));
                    }
                }
                _ => self.err(
                    item.span(),
                    format!(
                        "`{}`: expected a port from 1 to 65535, found {}",
                        t.kp(key),
                        found(item.get_ref())
                    ),
                ),
            }
        }
        Some(out)
    }

    /// The items of an array of tables (`[[key]]`).
    fn tables<'a, 'i>(
        &mut self,
        t: &Tbl<'a, 'i>,
        key: &str,
        schema: &'static Table,
    ) -> Vec<Tbl<'a, 'i>> {
        let Some(v) = t.get(key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.err(
                v.span(),
                format!(
                    "`{}`: expected an array of tables (`[[{}]]`), found {}",
                    t.kp(key),
                    t.kp(key),
                    found(v.get_ref())
                ),
            );
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.open(format!("{}[{i}]", t.kp(key)), item, schema))
            .collect()
    }

    fn subtable<'a, 'i>(
        &mut self,
        t: &Tbl<'a, 'i>,
        key: &str,
        schema: &'static Table,
    ) -> Option<Tbl<'a, 'i>> {
        let v = t.get(key)?;
        self.open(t.kp(key), v, schema)
    }
}

/// `vm.memory_mib` for `memory_mib` written at the top level, and the like.
fn nested_suggestion(key: &str, schema: &'static Table) -> Option<String> {
    schema.fields.iter().find_map(|f| match f.ty {
        Ty::Table(sub) => {
            text::suggest(key, sub.fields.iter().map(|x| x.name)).map(|s| format!("{}.{s}", f.name))
        }
        _ => None,
    })
}

/// Validates a parsed document into a manifest; `None` when any problem was found.
pub(crate) fn manifest(cx: &mut Cx, root: &DeTable<'_>) -> Option<Manifest> {
    let top = cx.open_map(String::new(), 0..0, root, &schema::MANIFEST);

    let app = if cx.require(&top, "app") {
        cx.str(&top, "app")
            .and_then(|(s, span)| match s.parse::<AppName>() {
                Ok(a) => Some(a),
                Err(e) => {
                    cx.err(span, format!("`app`: {e}"));
                    None
                }
            })
    } else {
        None
    };

    let image = cx.str(&top, "image").and_then(|(s, span)| {
        if s.is_empty() || s.chars().any(char::is_whitespace) || s.len() > 512 {
            cx.err(
                span,
                format!(
                    "`image`: expected an image reference like \"registry.example.com/app:v1\", found {:?}",
                    truncate(s)
                ),
            );
            None
        } else {
            Some(s.to_owned())
        }
    });

    let primary_region = cx
        .name(&top, "primary_region")
        .map(|(s, _)| s)
        .unwrap_or_else(|| defaults::PRIMARY_REGION.to_owned());
    let regions = match cx.names(&top, "regions") {
        Some(list) if list.is_empty() => {
            cx.err(
                top.key_span("regions"),
                "`regions`: expected at least one region; omit it to run in primary_region only",
            );
            vec![primary_region.clone()]
        }
        Some(list) => {
            if !list.iter().any(|(r, _)| *r == primary_region) {
                cx.err(
                    top.key_span("regions"),
                    format!("`regions`: expected it to include primary_region {primary_region:?}"),
                );
            }
            list.into_iter().map(|(r, _)| r).collect()
        }
        None => vec![primary_region.clone()],
    };

    let env = env(cx, &top);
    let vm = vm(cx, &top);
    let top_entrypoint = cx.command(&top, "entrypoint");
    let top_scale = cx
        .subtable(&top, "scale", &schema::SCALE)
        .map(|t| scale(cx, &t, &regions))
        .unwrap_or(Scale::fixed(defaults::COUNT));

    let processes = match top.get("processes") {
        Some(v) => {
            // Still check what is there, so that its own problems are reported too.
            let _ = (cx.command(&top, "command"), services(cx, &top));
            for key in ["command", "services"] {
                if top.get(key).is_some() {
                    cx.err(
                        top.key_span(key),
                        format!(
                            "`{key}` at the top level cannot be combined with [processes]; move it under [processes.<name>]"
                        ),
                    );
                }
            }
            process_groups(cx, v, &top_entrypoint, &top_scale, &regions)
        }
        None => {
            let services = services(cx, &top);
            vec![Process {
                name: defaults::PROCESS.to_owned(),
                entrypoint: top_entrypoint,
                command: cx.command(&top, "command"),
                scale: top_scale,
                services,
            }]
        }
    };
    check_service_conflicts(cx, &top, &processes);

    let group_names: Vec<&str> = processes.iter().map(|p| p.name.as_str()).collect();
    let mounts = mounts(cx, &top, &group_names);

    let deploy = cx
        .subtable(&top, "deploy", &schema::DEPLOY)
        .map(|t| deploy(cx, &t))
        .unwrap_or_default();
    let secrets = cx
        .subtable(&top, "secrets", &schema::SECRETS)
        .map(|t| Secrets {
            export_env: cx.bool(&t, "export_env").unwrap_or(false),
            reload: match cx.enumv(&t, "reload") {
                Some("signal") => SecretsReload::Signal,
                _ => SecretsReload::Restart,
            },
        })
        .unwrap_or_default();
    let metrics = cx
        .subtable(&top, "metrics", &schema::METRICS)
        .and_then(|t| {
            let port = cx.require(&t, "port").then(|| cx.int(&t, "port")).flatten();
            let path = http_path(cx, &t, "path").unwrap_or_else(|| "/metrics".to_owned());
            port.map(|(p, _)| Metrics {
                port: p as u16,
                path,
            })
        });
    let restart = cx
        .subtable(&top, "restart", &schema::RESTART)
        .map(|t| Restart {
            policy: match cx.enumv(&t, "policy") {
                Some("always") => RestartPolicy::Always,
                Some("never") => RestartPolicy::Never,
                _ => RestartPolicy::OnFailure,
            },
            max_retries: cx
                .int(&t, "max_retries")
                .map_or(defaults::MAX_RETRIES, |(n, _)| n as u32),
        })
        .unwrap_or_default();
    let stop_signal = cx
        .enumv(&top, "stop_signal")
        .unwrap_or(defaults::STOP_SIGNAL)
        .to_owned();
    let stop_timeout_ms = cx
        .duration(&top, "stop_timeout", 0, MAX_DURATION_MS)
        .unwrap_or(defaults::STOP_TIMEOUT_MS);

    if !cx.problems.is_empty() {
        return None;
    }
    Some(Manifest {
        app: app?,
        image,
        primary_region,
        regions,
        env,
        vm,
        processes,
        mounts,
        deploy,
        secrets,
        metrics,
        restart,
        stop_signal,
        stop_timeout_ms,
    })
}

fn env(cx: &mut Cx, top: &Tbl<'_, '_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(v) = top.get("env") else {
        return out;
    };
    let DeValue::Table(map) = v.get_ref() else {
        cx.mismatch(top, "env", v);
        return out;
    };
    for (k, val) in map.iter() {
        let key = k.get_ref().as_ref();
        if let Err(e) = text::check_env_name(key) {
            cx.err(k.span(), format!("`env.{key}`: {e}"));
            continue;
        }
        match val.get_ref() {
            DeValue::String(s) => {
                out.insert(key.to_owned(), s.to_string());
            }
            other => cx.err(
                val.span(),
                format!(
                    "`env.{key}`: expected a string, found {}; quote it: {key} = \"{}\"",
                    found(other),
                    match other {
                        DeValue::Integer(i) => i.to_string(),
                        DeValue::Float(f) => f.to_string(),
                        DeValue::Boolean(b) => b.to_string(),
                        _ => "...".to_owned(),
                    }
                ),
            ),
        }
    }
    out
}

fn vm(cx: &mut Cx, top: &Tbl<'_, '_>) -> Vm {
    let mut vm = Vm {
        cpus: defaults::CPUS,
        cpu_kind: CpuKind::Shared,
        memory: MiB(defaults::MEMORY_MIB),
        read_only_root: false,
    };
    if let Some(t) = cx.subtable(top, "vm", &schema::VM) {
        vm.read_only_root = cx.bool(&t, "read_only_root").unwrap_or(false);
        if let Some((n, _)) = cx.int(&t, "cpus") {
            vm.cpus = n as u32;
        }
        if cx.enumv(&t, "cpu_kind") == Some("performance") {
            vm.cpu_kind = CpuKind::Performance;
        }
        if let Some((n, _)) = cx.int(&t, "memory_mib") {
            vm.memory = MiB(n as u64);
        }
    }
    vm
}

fn scale(cx: &mut Cx, t: &Tbl<'_, '_>, app_regions: &[String]) -> Scale {
    let count = cx
        .int(t, "count")
        .map_or(defaults::COUNT, |(n, _)| n as u32);
    let min = cx.int(t, "min").map_or(count, |(n, _)| n as u32);
    let max = cx.int(t, "max").map_or(count, |(n, _)| n as u32);
    if !(min <= count && count <= max) {
        cx.err(
            t.span.clone(),
            format!(
                "`{}`: expected min ≤ count ≤ max, found min = {min}, count = {count}, max = {max}",
                t.path
            ),
        );
    }
    let regions = region_counts(cx, t, app_regions, min, max);
    Scale {
        count,
        min,
        max,
        regions,
    }
}

/// `[scale] regions = { ams = 3 }`: each key a region of the app, each count within min..=max.
fn region_counts(
    cx: &mut Cx,
    t: &Tbl<'_, '_>,
    app_regions: &[String],
    min: u32,
    max: u32,
) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let Some(v) = t.get("regions") else {
        return out;
    };
    let DeValue::Table(map) = v.get_ref() else {
        cx.mismatch(t, "regions", v);
        return out;
    };
    let path = t.kp("regions");
    for (k, val) in map.iter() {
        let region = k.get_ref().as_ref();
        if !app_regions.iter().any(|r| r == region) {
            let hint = text::suggest(region, app_regions.iter().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            cx.err(
                k.span(),
                format!(
                    "`{path}.{region}`: not a region of the app (regions = [{}]){hint}",
                    app_regions
                        .iter()
                        .map(|r| format!("{r:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            continue;
        }
        match int_of(val.get_ref()) {
            Some(Some(n)) if (0..=crate::MAX_COUNT as i64).contains(&n) => {
                let n = n as u32;
                if n < min || n > max {
                    cx.err(
                        val.span(),
                        format!(
                            "`{path}.{region}`: expected a count from min = {min} to max = {max}, found {n}"
                        ),
                    );
                }
                out.insert(region.to_owned(), n);
            }
            _ => cx.err(
                val.span(),
                format!(
                    "`{path}.{region}`: expected an instance count from 0 to {}, found {}",
                    crate::MAX_COUNT,
                    found(val.get_ref())
                ),
            ),
        }
    }
    out
}

fn process_groups(
    cx: &mut Cx,
    v: &Value<'_>,
    top_entrypoint: &Option<Vec<String>>,
    top_scale: &Scale,
    app_regions: &[String],
) -> Vec<Process> {
    let DeValue::Table(map) = v.get_ref() else {
        cx.err(
            v.span(),
            format!(
                "`processes`: expected a table of process groups ([processes.<name>]), found {}",
                found(v.get_ref())
            ),
        );
        return Vec::new();
    };
    if map.is_empty() {
        cx.err(
            v.span(),
            "`processes`: expected at least one process group ([processes.<name>]); omit [processes] for a single group",
        );
    }
    let mut out = Vec::new();
    for (k, pv) in map.iter() {
        let name = k.get_ref().as_ref();
        if let Err(e) = kiln_types::name::check_dns_label(name, 63) {
            cx.err(k.span(), format!("process group name: {e}"));
            continue;
        }
        let Some(t) = cx.open(format!("processes.{name}"), pv, &schema::PROCESS) else {
            continue;
        };
        let scale = cx
            .subtable(&t, "scale", &schema::SCALE)
            .map(|s| scale(cx, &s, app_regions))
            .unwrap_or_else(|| top_scale.clone());
        out.push(Process {
            name: name.to_owned(),
            entrypoint: cx
                .command(&t, "entrypoint")
                .or_else(|| top_entrypoint.clone()),
            command: cx.command(&t, "command"),
            scale,
            services: services(cx, &t),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn services(cx: &mut Cx, t: &Tbl<'_, '_>) -> Vec<Service> {
    let tables = cx.tables(t, "services", &schema::SERVICE);
    let mut out: Vec<Service> = Vec::new();
    for s in tables {
        let protocol = if cx.require(&s, "protocol") {
            cx.enumv(&s, "protocol")
        } else {
            None
        };
        let protocol = match protocol {
            Some("tcp") => ServiceProtocol::Tcp,
            _ => ServiceProtocol::Tls,
        };
        let internal_port = if cx.require(&s, "internal_port") {
            cx.int(&s, "internal_port")
        } else {
            None
        };
        if let Some((port, span)) = &internal_port {
            if out.iter().any(|o| i64::from(o.internal_port) == *port) {
                cx.err(
                    span.clone(),
                    format!(
                        "`{}.internal_port`: port {port} is already used by another service of this group",
                        s.path
                    ),
                );
            }
        }
        let ports = cx.ports(&s, "ports").unwrap_or_default();
        if protocol == ServiceProtocol::Tls && !ports.is_empty() {
            cx.err(
                s.key_span("ports"),
                format!(
                    "`{}.ports`: public ports are for tcp services; a tls service is routed by hostname (SNI), list them in `hostnames`",
                    s.path
                ),
            );
        }
        let mut hostnames = Vec::new();
        for (h, span) in cx.strings(&s, "hostnames").unwrap_or_default() {
            match text::check_hostname(h) {
                Err(e) => cx.err(span, format!("`{}.hostnames`: {h:?} {e}", s.path)),
                Ok(()) if hostnames.contains(&h.to_owned()) => cx.err(
                    span,
                    format!("`{}.hostnames`: {h:?} is listed twice", s.path),
                ),
                Ok(()) => hostnames.push(h.to_owned()),
            }
        }
        if protocol == ServiceProtocol::Tcp && !hostnames.is_empty() {
            cx.err(
                s.key_span("hostnames"),
                format!(
                    "`{}.hostnames`: hostnames are for tls services (routed by SNI); a tcp service is routed by its public `ports`",
                    s.path
                ),
            );
        }
        let concurrency = cx
            .subtable(&s, "concurrency", &schema::CONCURRENCY)
            .map(|c| {
                let soft = cx
                    .int(&c, "soft_limit")
                    .map_or(defaults::SOFT_LIMIT, |(n, _)| n as u32);
                let hard = cx
                    .int(&c, "hard_limit")
                    .map_or(defaults::HARD_LIMIT, |(n, _)| n as u32);
                if soft > hard {
                    cx.err(
                        c.span.clone(),
                        format!(
                            "`{}`: expected soft_limit ≤ hard_limit, found {soft} > {hard}",
                            c.path
                        ),
                    );
                }
                Concurrency {
                    soft_limit: soft,
                    hard_limit: hard,
                }
            })
            .unwrap_or_default();
        let checks = checks(cx, &s, protocol);
        out.push(Service {
            protocol,
            internal_port: internal_port.map_or(0, |(p, _)| p as u16),
            ports: ports.into_iter().map(|(p, _)| p).collect(),
            hostnames,
            proxy_protocol: cx.bool(&s, "proxy_protocol").unwrap_or(false),
            concurrency,
            checks,
        });
    }
    out
}

fn http_path(cx: &mut Cx, t: &Tbl<'_, '_>, key: &str) -> Option<String> {
    let (p, span) = cx.str(t, key)?;
    if !p.starts_with('/') || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        cx.err(
            span,
            format!(
                "`{}`: expected a path starting with '/', without spaces, found {:?}",
                t.kp(key),
                truncate(p)
            ),
        );
        return None;
    }
    Some(p.to_owned())
}

fn checks(cx: &mut Cx, s: &Tbl<'_, '_>, protocol: ServiceProtocol) -> Vec<CheckSpec> {
    if let Some(DeValue::Array(a)) = s.get("checks").map(Spanned::get_ref) {
        if a.is_empty() {
            cx.err(
                s.key_span("checks"),
                format!(
                    "`{}.checks`: expected at least one check; omit `checks` for the default tcp check",
                    s.path
                ),
            );
        }
    }
    if s.get("checks").is_none() {
        return vec![CheckSpec::default_tcp()];
    }
    let mut out = Vec::new();
    for c in cx.tables(s, "checks", &schema::CHECK) {
        let kind = cx.enumv(&c, "kind").unwrap_or("tcp");
        for (key, only) in [("path", "http"), ("tls", "http"), ("command", "exec")] {
            if c.get(key).is_some() && kind != only {
                cx.err(
                    c.key_span(key),
                    format!(
                        "`{}.{key}` applies to {only} checks only; this check is {kind}",
                        c.path
                    ),
                );
            }
        }
        let kind = match kind {
            "http" => CheckKind::Http {
                path: http_path(cx, &c, "path").unwrap_or_else(|| "/".to_owned()),
                tls: cx
                    .bool(&c, "tls")
                    .unwrap_or(protocol == ServiceProtocol::Tls),
            },
            "exec" => CheckKind::Exec {
                command: if cx.require(&c, "command") {
                    cx.command(&c, "command").unwrap_or_default()
                } else {
                    Vec::new()
                },
            },
            _ => CheckKind::Tcp,
        };
        let interval_ms = cx
            .duration(&c, "interval", 1_000, 3_600_000)
            .unwrap_or(CheckSpec::DEFAULT_INTERVAL_MS);
        let timeout_ms = cx
            .duration(&c, "timeout", 1, 3_600_000)
            .unwrap_or(CheckSpec::DEFAULT_TIMEOUT_MS);
        if timeout_ms > interval_ms {
            cx.err(
                c.key_span("timeout"),
                format!(
                    "`{}.timeout`: expected at most the interval ({}), found {}",
                    c.path,
                    text::format_duration(interval_ms),
                    text::format_duration(timeout_ms)
                ),
            );
        }
        let grace_period_ms = cx
            .duration(&c, "grace_period", 0, 3_600_000)
            .unwrap_or(CheckSpec::DEFAULT_GRACE_PERIOD_MS);
        out.push(CheckSpec {
            kind,
            interval_ms,
            timeout_ms,
            grace_period_ms,
        });
    }
    out
}

/// Hostnames and public ports are app-wide: two services (of any groups) cannot share one.
fn check_service_conflicts(cx: &mut Cx, top: &Tbl<'_, '_>, processes: &[Process]) {
    let mut hostnames: BTreeSet<&str> = BTreeSet::new();
    let mut ports: BTreeSet<u16> = BTreeSet::new();
    let span = top
        .get("processes")
        .map(|_| top.key_span("processes"))
        .unwrap_or_else(|| top.key_span("services"));
    for p in processes {
        for s in &p.services {
            for h in &s.hostnames {
                if !hostnames.insert(h) {
                    cx.err(
                        span.clone(),
                        format!(
                            "hostname {h:?} is routed to two services; each hostname goes to one"
                        ),
                    );
                }
            }
            for port in &s.ports {
                if !ports.insert(*port) {
                    cx.err(
                        span.clone(),
                        format!(
                            "public port {port} is routed to two services; each port goes to one"
                        ),
                    );
                }
            }
        }
    }
}

fn mounts(cx: &mut Cx, top: &Tbl<'_, '_>, groups: &[&str]) -> Vec<Mount> {
    let mut out: Vec<Mount> = Vec::new();
    for m in cx.tables(top, "mounts", &schema::MOUNT) {
        let volume = if cx.require(&m, "volume") {
            cx.name(&m, "volume")
        } else {
            None
        };
        if let Some((v, span)) = &volume {
            if out.iter().any(|o| &o.volume == v) {
                cx.err(
                    span.clone(),
                    format!("`{}.volume`: volume {v:?} is mounted twice", m.path),
                );
            }
        }
        let path = if cx.require(&m, "path") {
            cx.str(&m, "path")
        } else {
            None
        };
        let path = path.and_then(|(p, span)| {
            let reserved = ["/.kiln", "/proc", "/sys", "/dev"];
            let bad = if !p.starts_with('/') || p == "/" {
                Some("an absolute path other than /".to_owned())
            } else if p.split('/').any(|c| c == ".." || c == ".") {
                Some("a path without `.` or `..` components".to_owned())
            } else {
                reserved
                    .iter()
                    .find(|r| p == **r || p.starts_with(&format!("{r}/")))
                    .map(|r| format!("a path outside {r}, which the platform uses"))
            };
            match bad {
                Some(why) => {
                    cx.err(
                        span,
                        format!("`{}.path`: expected {why}, found {:?}", m.path, truncate(p)),
                    );
                    None
                }
                None => Some(p.trim_end_matches('/').to_owned()),
            }
        });
        let initial_size = match m.get("initial_size") {
            Some(v) => match v.get_ref() {
                DeValue::String(s) => match text::parse_size_mib(s) {
                    Some(n) if (64..=crate::MAX_VOLUME_MIB).contains(&n) => Some(n),
                    _ => {
                        cx.err(
                            v.span(),
                            format!(
                                "`{}.initial_size`: expected a size from 64mb to 16tb like \"512mb\" or \"10gb\", found {:?}",
                                m.path,
                                truncate(s)
                            ),
                        );
                        None
                    }
                },
                _ => {
                    cx.mismatch(&m, "initial_size", v);
                    None
                }
            },
            None => None,
        }
        .unwrap_or(defaults::VOLUME_SIZE_MIB);
        let processes = match cx.names(&m, "processes") {
            Some(list) => {
                for (p, span) in &list {
                    if !groups.contains(&p.as_str()) {
                        let mut msg = format!(
                            "`{}.processes`: there is no process group {p:?} (groups: {})",
                            m.path,
                            groups.join(", ")
                        );
                        if let Some(s) = text::suggest(p, groups.iter().copied()) {
                            msg.push_str(&format!("; did you mean {s:?}?"));
                        }
                        cx.err(span.clone(), msg);
                    }
                }
                if list.is_empty() {
                    cx.err(
                        m.key_span("processes"),
                        format!(
                            "`{}.processes`: expected at least one process group; omit it for all",
                            m.path
                        ),
                    );
                }
                let mut l: Vec<String> = list.into_iter().map(|(p, _)| p).collect();
                l.sort();
                l
            }
            None => groups.iter().map(|g| (*g).to_owned()).collect(),
        };
        if let Some(path) = &path {
            if out
                .iter()
                .any(|o| &o.path == path && o.processes.iter().any(|g| processes.contains(g)))
            {
                cx.err(
                    m.key_span("path"),
                    format!(
                        "`{}.path`: another volume is already mounted at {path:?}",
                        m.path
                    ),
                );
            }
        }
        out.push(Mount {
            volume: volume.map(|(v, _)| v).unwrap_or_default(),
            path: path.unwrap_or_default(),
            initial_size: MiB(initial_size),
            processes,
        });
    }
    out
}

fn deploy(cx: &mut Cx, t: &Tbl<'_, '_>) -> Deploy {
    let strategy = match cx.enumv(t, "strategy") {
        Some("canary") => Strategy::Canary,
        Some("bluegreen") => Strategy::Bluegreen,
        Some("immediate") => Strategy::Immediate,
        _ => Strategy::Rolling,
    };
    let max_unavailable = match t.get("max_unavailable") {
        None => MaxUnavailable::default(),
        Some(v) => {
            let parsed = match v.get_ref() {
                DeValue::Integer(_) => match int_of(v.get_ref()).flatten() {
                    Some(n) if (1..=i64::from(crate::MAX_COUNT)).contains(&n) => {
                        Some(MaxUnavailable::Count(n as u32))
                    }
                    _ => None,
                },
                DeValue::String(s) => s
                    .strip_suffix('%')
                    .and_then(|n| n.parse::<u8>().ok())
                    .filter(|n| (1..=100).contains(n))
                    .map(MaxUnavailable::Percent),
                _ => None,
            };
            parsed.unwrap_or_else(|| {
                cx.err(
                    v.span(),
                    format!(
                        "`{}`: expected a count from 1 to {} or a percentage from \"1%\" to \"100%\", found {}",
                        t.kp("max_unavailable"),
                        crate::MAX_COUNT,
                        found(v.get_ref())
                    ),
                );
                MaxUnavailable::default()
            })
        }
    };
    Deploy {
        strategy,
        max_unavailable,
        release_command: cx.command(t, "release_command"),
        health_timeout_ms: cx
            .duration(t, "health_timeout", 1, MAX_DURATION_MS)
            .unwrap_or(defaults::HEALTH_TIMEOUT_MS),
        auto_rollback: cx.bool(t, "auto_rollback").unwrap_or(true),
    }
}
