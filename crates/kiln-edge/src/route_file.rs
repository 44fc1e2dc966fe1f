//! The static route file of `kilnd edge --routes FILE`.
//!
//! The file holds a [`RouteTable`], the same document `GET /v1/routes` returns: JSON, or TOML when
//! the file name ends in `.toml`. An operator can dump what the control plane serves, edit it and
//! run an edge from it; tests run an edge without a control plane.
//!
//! ```toml
//! [[routes]]
//! hostname = "app.example.com"
//! app = "app"
//! proxy_protocol = true
//! backends = ["[fdb5:696c:6e00:1::100]:8443"]
//! concurrency = { soft_limit = 200, hard_limit = 250 }
//!
//! [[ports]]
//! listen = "203.0.113.7:5432"
//! app = "db"
//! protocol = "tcp"
//! proxy_protocol = false
//! backends = ["[fdb5:696c:6e00:2::101]:5432"]
//! ```

use std::path::{Path, PathBuf};

use kiln_api::RouteTable;

/// A route file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RouteFileError {
    #[error("cannot read route file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("route file {path} is not a valid JSON route table")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("route file {path} is not a valid TOML route table")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// Reads and parses a route file.
pub fn load(path: &Path) -> Result<RouteTable, RouteFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| RouteFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|source| RouteFileError::Toml {
            path: path.to_owned(),
            source,
        })
    } else {
        serde_json::from_str(&text).map_err(|source| RouteFileError::Json {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_toml_example_parses() {
        let doc = include_str!("route_file.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//! "))
            .skip_while(|l| !l.starts_with("```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("```"))
            .collect::<Vec<_>>()
            .join("\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, doc).unwrap();
        let t = load(&path).unwrap();
        assert_eq!(t.routes[0].hostname, "app.example.com");
        assert_eq!(t.routes[0].concurrency.unwrap().hard_limit, 250);
        assert_eq!(t.ports[0].listen, "203.0.113.7:5432".parse().unwrap());
    }

    #[test]
    fn json_as_served_by_the_control_plane() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.json");
        std::fs::write(
            &path,
            r#"{"seq":7,"routes":[{"hostname":"a.kiln.test","app":"a","proxy_protocol":false,"backends":["127.0.0.1:1"]}]}"#,
        )
        .unwrap();
        let t = load(&path).unwrap();
        assert_eq!(t.seq, 7);
        assert!(t.routes[0].concurrency.is_none());
        assert!(t.ports.is_empty());
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(load(&path), Err(RouteFileError::Json { .. })));
    }
}
