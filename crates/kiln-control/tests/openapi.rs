//! The committed OpenAPI document is the one the code generates, and it covers exactly the
//! routes the router registers. `KILN_BLESS=1 cargo nextest run -p kiln-control --test openapi`
//! rewrites `docs/specs/api/openapi.yaml` from the code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn committed_openapi_matches_the_code() {
    let path = root().join("docs/specs/api/openapi.yaml");
    let generated = kiln_control::openapi_yaml();
    if std::env::var_os("KILN_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write openapi.yaml");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1)
            .unwrap_or(committed.lines().count().min(generated.lines().count()) + 1);
        panic!(
            "docs/specs/api/openapi.yaml differs from the document the code generates (first at \
             line {line}). Regenerate it: KILN_BLESS=1 cargo nextest run -p kiln-control --test \
             openapi"
        );
    }
}

/// (METHOD, path) of every `.route(...)` call in the control plane's source.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![root().join("crates/kiln-control/src")];
    let mut sources = Vec::new();
    while let Some(p) = dirs.pop() {
        if p.is_dir() {
            dirs.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if p.extension().is_some_and(|e| e == "rs") {
            sources.push(std::fs::read_to_string(&p).unwrap());
        }
    }
    for src in sources {
        let mut rest = src.as_str();
        while let Some(i) = rest.find(".route(") {
            let args = &rest[i + 7..];
            let mut depth = 1;
            let mut end = args.len();
            for (j, c) in args.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = j;
                    break;
                }
            }
            let call = &args[..end];
            let path = call.split('"').nth(1).unwrap_or_default().to_owned();
            for m in ["get", "post", "put", "patch", "delete"] {
                let mut s = call;
                while let Some(k) = s.find(&format!("{m}(")) {
                    if !s[..k]
                        .chars()
                        .last()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                    {
                        out.insert((m.to_uppercase(), path.clone()));
                    }
                    s = &s[k + m.len()..];
                }
            }
            rest = &args[end..];
        }
    }
    out
}

#[test]
fn every_route_is_in_the_openapi_document() {
    let doc = kiln_control::openapi_document();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let registered = routes_in_source();
    assert!(registered.len() >= 10, "read no routes: {registered:?}");
    let missing: Vec<_> = registered.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&registered).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "routes without a #[utoipa::path] listed in api/openapi.rs: {missing:?}\n\
         documented but not routed: {stale:?}"
    );
    // Every operation names its scopes (the tenant walk reads them) and has the problem
    // response.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["security"].is_array(),
                "{method} {path} has no security requirement"
            );
            assert!(
                op["responses"]["default"].is_object(),
                "{method} {path} has no problem response"
            );
        }
    }
}
