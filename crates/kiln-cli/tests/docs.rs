//! The docs check: `docs/` is the outline's document tree, and what it says about the code stays
//! true. The rules are written for people in docs/README.md ("How the docs are checked"); each
//! test below enforces one of them and says in its failure message how to fix the docs.
//!
//! 1. every path of the outline exists (outline from `../shared/seed/`, else docs/outline-paths.txt,
//!    and the two agree when both exist);
//! 2. docs/INDEX.md lists exactly the files under docs/, with each file's own header fields;
//! 3. every relative link in docs/ (and the root README.md) resolves;
//! 4. every `kiln ...` line in a checked code block is a real command of the CLI, flags included;
//! 5. every doc starts with the header block and a valid status; no heading is left empty;
//! 6. every diagram's .svg is exactly what `dot -Tsvg` renders from the .dot beside it;
//! 7. the specs that restate code (event catalog, exit codes, manifest defaults, WorkloadSpec,
//!    HTTP routes) agree with the code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

const STATUSES: &[&str] = &["draft", "partial", "built"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn docs_dir() -> PathBuf {
    root().join("docs")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every file under docs/, as paths relative to the workspace root (`docs/...`), sorted.
fn doc_files() -> BTreeSet<String> {
    fn walk(dir: &Path, base: &Path, out: &mut BTreeSet<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                let rel = p.strip_prefix(base).expect("under root");
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&docs_dir(), &root(), &mut out);
    out
}

fn markdown_files() -> Vec<String> {
    doc_files()
        .into_iter()
        .filter(|f| f.ends_with(".md"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. The outline.

/// The `docs/...` paths named in backticks in the outline, in order of appearance.
fn outline_paths(outline: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in outline.lines() {
        let mut rest = line;
        while let Some(start) = rest.find('`') {
            let after = &rest[start + 1..];
            let Some(end) = after.find('`') else { break };
            let token = &after[..end];
            let is_file =
                token.starts_with("docs/") && !token.ends_with('/') && !token.contains(' ');
            if is_file && !out.iter().any(|p| p == token) {
                out.push(token.to_owned());
            }
            rest = &after[end + 1..];
        }
    }
    out
}

/// Paths in docs/outline-paths.txt (one per line; `#` starts a comment line).
fn committed_outline_paths() -> Vec<String> {
    read(&docs_dir().join("outline-paths.txt"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_outline_path_exists() {
    let outline_file = root().join("../shared/seed/platform-docs-outline.md");
    let committed = committed_outline_paths();
    let paths = if outline_file.is_file() {
        let from_outline = outline_paths(&read(&outline_file));
        assert!(
            from_outline.len() > 50,
            "the outline names only {} paths",
            from_outline.len()
        );
        let a: BTreeSet<_> = from_outline.iter().collect();
        let b: BTreeSet<_> = committed.iter().collect();
        assert!(
            a == b,
            "docs/outline-paths.txt differs from {}:\n  only in the outline: {:?}\n  only in the \
             list: {:?}\nUpdate docs/outline-paths.txt to the outline's paths.",
            outline_file.display(),
            a.difference(&b).collect::<Vec<_>>(),
            b.difference(&a).collect::<Vec<_>>()
        );
        from_outline
    } else {
        committed
    };
    let missing: Vec<_> = paths.iter().filter(|p| !root().join(p).is_file()).collect();
    assert!(
        missing.is_empty(),
        "outline paths missing under docs/: {missing:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Headers (used by the INDEX check too).

#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    status: String,
    owner: String,
    reviewed: String,
}

fn valid_date(d: &str) -> bool {
    let b = d.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && d.bytes()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
        && (1..=12).contains(&d[5..7].parse::<u32>().unwrap_or(0))
        && (1..=31).contains(&d[8..10].parse::<u32>().unwrap_or(0))
}

/// Parses `Status: <s> · Owner: <o> · Last reviewed: <YYYY-MM-DD>` anywhere in `line` (so that
/// it can sit behind a comment marker in .yaml, .dot and .txt files).
fn parse_header_line(line: &str) -> Option<Result<Header, String>> {
    let start = line.find("Status: ")?;
    let parts: Vec<&str> = line[start..].trim_end().split(" · ").collect();
    let field = |i: usize, key: &str| -> Result<String, String> {
        parts
            .get(i)
            .and_then(|p| p.strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| format!("expected `{key}<value>` as field {} of {line:?}", i + 1))
    };
    Some((|| {
        if parts.len() != 3 {
            return Err(format!(
                "expected three fields separated by ` · ` in {line:?}"
            ));
        }
        let h = Header {
            status: field(0, "Status: ")?,
            owner: field(1, "Owner: ")?,
            reviewed: field(2, "Last reviewed: ")?,
        };
        if !STATUSES.contains(&h.status.as_str()) {
            return Err(format!("status {:?} is not one of {STATUSES:?}", h.status));
        }
        if h.owner.is_empty()
            || !h
                .owner
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "owner {:?} must be a lowercase area name like `scheduler`",
                h.owner
            ));
        }
        if !valid_date(&h.reviewed) {
            return Err(format!(
                "last reviewed {:?} is not a YYYY-MM-DD date",
                h.reviewed
            ));
        }
        Ok(h)
    })())
}

/// The header of a doc (read from the .dot source for a rendered .svg).
fn header_of(rel: &str) -> Result<Header, String> {
    let source = match rel.strip_suffix(".svg") {
        Some(stem) => format!("{stem}.dot"),
        None => rel.to_owned(),
    };
    let text = std::fs::read_to_string(root().join(&source))
        .map_err(|e| format!("cannot read {source}: {e}"))?;
    if source.ends_with(".md") && !text.starts_with("# ") {
        return Err(format!("{source} must start with a `# Title` line"));
    }
    for line in text.lines().take(5) {
        // JSON has no comments: a .json doc carries its header in a `"$comment"` string.
        let line = if source.ends_with(".json") {
            line.trim_end().trim_end_matches(',').trim_end_matches('"')
        } else {
            line
        };
        if let Some(h) = parse_header_line(line) {
            return h.map_err(|e| format!("{source}: {e}"));
        }
    }
    Err(format!(
        "{source} has no header in its first 5 lines; expected \
         `Status: draft|partial|built · Owner: <area> · Last reviewed: YYYY-MM-DD`"
    ))
}

/// Lines of a markdown file outside fenced code blocks, with their 1-based numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        match fence {
            Some(f) if t.starts_with(f) => fence = None,
            Some(_) => {}
            None if t.starts_with("```") || t.starts_with("~~~") => fence = Some(&t[..3]),
            None => out.push((i + 1, line)),
        }
    }
    out
}

#[test]
fn every_doc_has_a_header_and_no_empty_heading() {
    let mut problems = Vec::new();
    for f in doc_files() {
        if let Err(e) = header_of(&f) {
            problems.push(e);
        }
        if !f.ends_with(".md") {
            continue;
        }
        // A heading followed by a heading of the same or a higher level (or by the end of the
        // file) has nothing under it.
        // Code blocks count as content; `#` lines inside them are not headings.
        let text = read(&root().join(&f));
        let prose: BTreeSet<usize> = prose_lines(&text).into_iter().map(|(no, _)| no).collect();
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l))
            .filter(|(_, l)| !l.trim().is_empty())
            .collect();
        let level = |no: usize, l: &str| {
            let n = l.bytes().take_while(|b| *b == b'#').count();
            (prose.contains(&no) && n > 0 && l.as_bytes().get(n) == Some(&b' ')).then_some(n)
        };
        for (idx, (no, line)) in lines.iter().enumerate() {
            let Some(lv) = level(*no, line) else { continue };
            let empty = match lines.get(idx + 1) {
                None => true,
                Some((n, l)) => level(*n, l).is_some_and(|n| n <= lv),
            };
            if empty && lv > 1 {
                problems.push(format!("{f}:{no}: heading {line:?} has no content"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "doc header problems:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. INDEX.md.

/// Targets of the markdown links `[text](target)` in `s`.
fn link_targets(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].trim().to_owned());
        rest = &after[end + 1..];
    }
    out
}

/// `s` with inline code spans removed, so that link-like text inside them is not a link.
fn strip_code_spans(s: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    for c in s.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

#[test]
fn index_lists_exactly_the_docs_with_their_headers() {
    let index = read(&docs_dir().join("INDEX.md"));
    let mut listed: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for (no, line) in prose_lines(&index) {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if !line.trim_start().starts_with('|') || cells.len() < 4 {
            continue;
        }
        let targets = link_targets(cells[0]);
        if targets.is_empty() {
            continue; // header row or separator
        }
        for t in &targets {
            let rel = format!("docs/{t}");
            if listed.insert(rel.clone(), no).is_some() {
                problems.push(format!("INDEX.md:{no}: {t} is listed twice"));
            }
        }
        let doc = format!("docs/{}", targets[0]);
        let row = Header {
            status: cells[1].trim_matches('`').to_owned(),
            owner: cells[2].trim_matches('`').to_owned(),
            reviewed: cells[3].trim_matches('`').to_owned(),
        };
        match header_of(&doc) {
            Ok(h) if h != row => problems.push(format!(
                "INDEX.md:{no}: row of {doc} says {row:?} but the doc's header says {h:?}"
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("INDEX.md:{no}: {e}")),
        }
    }
    let mut expected = doc_files();
    expected.remove("docs/INDEX.md");
    let listed_set: BTreeSet<String> = listed.keys().cloned().collect();
    for missing in expected.difference(&listed_set) {
        problems.push(format!("INDEX.md does not list {missing}"));
    }
    for extra in listed_set.difference(&expected) {
        problems.push(format!("INDEX.md lists {extra}, which does not exist"));
    }
    assert!(
        problems.is_empty(),
        "INDEX.md problems:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Links.

#[test]
fn relative_links_resolve() {
    let mut files: Vec<String> = markdown_files();
    if root().join("README.md").is_file() {
        files.push("README.md".into());
    }
    let mut problems = Vec::new();
    for f in files {
        let text = read(&root().join(&f));
        let dir = root().join(&f).parent().expect("parent").to_owned();
        for (no, line) in prose_lines(&text) {
            for target in link_targets(&strip_code_spans(line)) {
                let target = target.split_whitespace().next().unwrap_or("");
                if target.is_empty()
                    || target.starts_with('#')
                    || target.contains("://")
                    || target.starts_with("mailto:")
                {
                    continue;
                }
                let path = target.split('#').next().unwrap_or(target);
                if !dir.join(path).exists() {
                    problems.push(format!("{f}:{no}: link target {target:?} does not exist"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "broken relative links:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 4. CLI commands.

/// Fenced blocks whose lines are checked: untagged, or tagged as a shell session.
fn checked_block(info: &str) -> bool {
    matches!(
        info.split_whitespace().next(),
        None | Some("sh" | "bash" | "shell" | "console")
    )
}

/// The `kiln ...` command lines of checked code blocks in `text`, with their line numbers;
/// continuation lines (ending in `\`) are joined.
fn kiln_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_block: Option<bool> = None;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("```") {
            in_block = match in_block {
                Some(_) => None,
                None => Some(checked_block(t.trim_start_matches('`'))),
            };
            continue;
        }
        if in_block != Some(true) {
            continue;
        }
        if let Some((no, mut acc)) = pending.take() {
            acc.push(' ');
            acc.push_str(t.trim_end_matches('\\').trim());
            if t.trim_end().ends_with('\\') {
                pending = Some((no, acc));
            } else {
                out.push((no, acc));
            }
            continue;
        }
        let cmd = t.strip_prefix("$ ").unwrap_or(t);
        if cmd.starts_with("kiln ") {
            let body = cmd.trim_end().trim_end_matches('\\').trim().to_owned();
            if cmd.trim_end().ends_with('\\') {
                pending = Some((i + 1, body));
            } else {
                out.push((i + 1, body));
            }
        }
    }
    out
}

/// Checks one `kiln ...` line against the command tree; returns what is wrong with it.
fn check_command(root_cmd: &clap::Command, line: &str) -> Result<(), String> {
    let words: Vec<&str> = line
        .split_whitespace()
        .skip(1)
        .take_while(|w| !matches!(*w, "|" | "||" | "&&" | ";" | ">" | "2>&1" | "#"))
        // Usage lines mark optional parts with brackets: `[--json]`.
        .map(|w| w.trim_matches(|c| c == '[' || c == ']'))
        .filter(|w| !w.is_empty())
        .collect();
    let mut path: Vec<&clap::Command> = vec![root_cmd];
    let mut positional_seen = false;
    for w in &words {
        let cur = *path.last().expect("non-empty");
        if let Some(flag) = w.strip_prefix("--") {
            let name = flag.split('=').next().unwrap_or(flag);
            if name.is_empty() || matches!(name, "help" | "version") {
                continue;
            }
            let known = path.iter().enumerate().any(|(i, c)| {
                c.get_arguments().any(|a| {
                    a.get_long() == Some(name) && (i + 1 == path.len() || a.is_global_set())
                })
            });
            if !known {
                return Err(format!("`{}` has no flag --{name}", cur.get_name()));
            }
            continue;
        }
        if w.starts_with('-') || positional_seen {
            continue;
        }
        if cur.has_subcommands() {
            match cur.find_subcommand(w) {
                Some(sub) => path.push(sub),
                None => {
                    let names: Vec<&str> = cur.get_subcommands().map(|c| c.get_name()).collect();
                    return Err(format!(
                        "`{}` has no subcommand `{w}` (it has: {})",
                        cur.get_name(),
                        names.join(", ")
                    ));
                }
            }
        } else {
            positional_seen = true;
        }
    }
    let last = path.last().expect("non-empty");
    if last.has_subcommands() && !words.iter().any(|w| *w == "--help" || *w == "-h") {
        return Err(format!("`{}` needs a subcommand", last.get_name()));
    }
    Ok(())
}

#[test]
fn cli_commands_in_docs_exist() {
    let mut cli = kiln_cli::Cli::command();
    cli.build();
    let mut files: Vec<String> = markdown_files();
    if root().join("README.md").is_file() {
        files.push("README.md".into());
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    for f in files {
        for (no, line) in kiln_lines(&read(&root().join(&f))) {
            checked += 1;
            if let Err(e) = check_command(&cli, &line) {
                problems.push(format!(
                    "{f}:{no}: `{line}`: {e}\n    (a planned command belongs in prose or in a \
                     ```text block, see docs/README.md)"
                ));
            }
        }
    }
    assert!(
        checked > 10,
        "only {checked} kiln command lines found; is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "commands in docs that kiln does not have:\n{}",
        problems.join("\n")
    );
}

#[test]
fn command_checker_rejects_what_kiln_lacks() {
    let mut cli = kiln_cli::Cli::command();
    cli.build();
    assert!(check_command(&cli, "kiln apps create demo").is_ok());
    assert!(check_command(&cli, "kiln deploy --config kiln.toml --image x").is_ok());
    assert!(check_command(&cli, "kiln status -a demo --json").is_ok());
    assert!(check_command(&cli, "kiln apps rename demo").is_err());
    assert!(check_command(&cli, "kiln widgets list").is_err());
    assert!(check_command(&cli, "kiln deploy --strategy canary").is_err());
    assert!(check_command(&cli, "kiln apps").is_err());
    let block = "```text\nkiln logs\n```\n```sh\n$ kiln whoami\nkiln deploy \\\n  --detach\n```\n";
    assert_eq!(
        kiln_lines(block),
        vec![
            (5, "kiln whoami".to_owned()),
            (6, "kiln deploy --detach".to_owned())
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Diagrams.

#[test]
fn diagrams_are_rendered_from_their_sources() {
    let dir = docs_dir().join("diagrams");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("docs/diagrams")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "dot"))
        .collect();
    sources.sort();
    assert!(
        sources.len() >= 4,
        "expected the four diagram sources in docs/diagrams"
    );
    let mut problems = Vec::new();
    for dot in &sources {
        let svg = dot.with_extension("svg");
        let out = match Command::new("dot").arg("-Tsvg").arg(dot).output() {
            Ok(o) => o,
            Err(e) => panic!(
                "cannot run Graphviz `dot` ({e}): the docs check renders every diagram and \
                 compares it with the committed .svg. Install graphviz (./scripts/install-deps \
                 does: apt-get install --no-install-recommends graphviz)."
            ),
        };
        assert!(
            out.status.success(),
            "dot -Tsvg {} failed: {}",
            dot.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let committed = std::fs::read(&svg).unwrap_or_default();
        if committed != out.stdout {
            let rel = |p: &Path| p.strip_prefix(root()).unwrap_or(p).display().to_string();
            problems.push(format!(
                "{} is not what its source renders to; run `dot -Tsvg {} -o {}`",
                rel(&svg),
                rel(dot),
                rel(&svg)
            ));
        }
    }
    let svgs = std::fs::read_dir(&dir)
        .expect("docs/diagrams")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "svg"));
    for svg in svgs {
        if !svg.with_extension("dot").is_file() {
            problems.push(format!("{} has no .dot source beside it", svg.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "diagram problems:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Specs that restate code.

/// Names in `### \`name\`` headings, in order.
fn code_headings(text: &str, level: &str) -> Vec<String> {
    prose_lines(text)
        .into_iter()
        .filter_map(|(_, l)| l.strip_prefix(level))
        .filter_map(|l| l.trim().strip_prefix('`').and_then(|r| r.strip_suffix('`')))
        .map(str::to_owned)
        .collect()
}

#[test]
fn event_catalog_matches_the_code() {
    let doc = read(&docs_dir().join("specs/state/event-types.md"));
    let documented = code_headings(&doc, "### ");
    let code: Vec<String> = kiln_types::event::Event::CATALOG
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(
        documented, code,
        "docs/specs/state/event-types.md must have one `### \\`type\\`` section per event of \
         kiln_types::event::Event::CATALOG, in catalog order"
    );
}

/// Table rows of a markdown text as trimmed cells (header and separator rows included).
fn table_rows(text: &str) -> Vec<Vec<String>> {
    prose_lines(text)
        .into_iter()
        .filter(|(_, l)| l.trim_start().starts_with('|'))
        .map(|(_, l)| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn exit_codes_match_the_code() {
    // exit.rs is the single list of `pub const NAME: i32 = N;`; read it as text so that a new
    // code shows up here without editing this test.
    let src = read(&root().join("crates/kiln-cli/src/exit.rs"));
    let code: BTreeMap<i32, String> = src
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| {
            let (name, rest) = l.split_once(": i32 = ")?;
            Some((
                rest.trim_end_matches(';').trim().parse().ok()?,
                name.to_owned(),
            ))
        })
        .collect();
    assert!(
        code.len() >= 5,
        "could not read the exit codes from exit.rs"
    );
    let doc = read(&docs_dir().join("cli/04-errors-and-exit-codes.md"));
    let documented: BTreeMap<i32, String> = table_rows(&doc)
        .into_iter()
        .filter_map(|r| {
            let n = r.first()?.parse().ok()?;
            Some((n, r.get(1)?.trim_matches('`').to_owned()))
        })
        .collect();
    assert_eq!(
        documented, code,
        "the exit-code table of docs/cli/04-errors-and-exit-codes.md (| code | `NAME` | ...) must \
         list exactly the constants of crates/kiln-cli/src/exit.rs"
    );
}

#[test]
fn manifest_defaults_and_examples_match_the_code() {
    use kiln_manifest::defaults as d;
    let doc = read(&docs_dir().join("specs/manifest/manifest-schema.md"));
    let rows = table_rows(&doc);
    let expected = [
        ("primary_region", format!("\"{}\"", d::PRIMARY_REGION)),
        ("vm.cpus", d::CPUS.to_string()),
        ("vm.memory_mib", d::MEMORY_MIB.to_string()),
        ("scale.count", d::COUNT.to_string()),
        (
            "deploy.health_timeout",
            format!("\"{}s\"", d::HEALTH_TIMEOUT_MS / 1000),
        ),
        ("stop_signal", format!("\"{}\"", d::STOP_SIGNAL)),
        (
            "stop_timeout",
            format!("\"{}s\"", d::STOP_TIMEOUT_MS / 1000),
        ),
    ];
    for (key, value) in expected {
        let row = rows
            .iter()
            .find(|r| r.first().map(String::as_str) == Some(&format!("`{key}`")));
        let Some(row) = row else {
            panic!("manifest-schema.md has no table row for `{key}`");
        };
        assert!(
            row.iter().any(|c| c == &format!("`{value}`")),
            "manifest-schema.md: the row of `{key}` must show the default `{value}` (code: \
             kiln_manifest::defaults); row: {row:?}"
        );
    }
    // Every ```toml block under docs/ is a manifest that kiln accepts (planned syntax goes in
    // ```text blocks), and the sample app's manifest parses too.
    let mut checked = 0;
    for f in markdown_files() {
        let text = read(&root().join(&f));
        let mut block: Option<(usize, String)> = None;
        for (i, line) in text.lines().enumerate() {
            match &mut block {
                None if line.trim_start() == "```toml" => block = Some((i + 1, String::new())),
                Some((start, body)) if line.trim_start().starts_with("```") => {
                    if let Err(e) = kiln_manifest::parse(&f, body) {
                        panic!(
                            "{f}:{start}: this ```toml block is not a valid kiln.toml:\n{}",
                            e.report()
                        );
                    }
                    checked += 1;
                    block = None;
                }
                Some((_, body)) => {
                    body.push_str(line);
                    body.push('\n');
                }
                None => {}
            }
        }
    }
    assert!(
        checked >= 2,
        "expected manifest examples in ```toml blocks, found {checked}"
    );
    let sample = root().join("examples/hello-tls/kiln.toml");
    kiln_manifest::parse("kiln.toml", &read(&sample)).expect("examples/hello-tls/kiln.toml parses");
}

#[test]
fn workload_spec_doc_matches_the_code() {
    let doc = read(&docs_dir().join("specs/workload-spec.md"));
    let version = kiln_types::WORKLOAD_SPEC_VERSION;
    assert!(
        doc.contains(&format!("Current version: `{version}`")),
        "workload-spec.md must say `Current version: \\`{version}\\`` (WORKLOAD_SPEC_VERSION)"
    );
    // The ```json example is a real spec: it must deserialize, and every field it serializes to
    // must be in the field table (`| \`path\` | ...`).
    let start = doc
        .find("```json\n")
        .expect("workload-spec.md has a ```json example")
        + 8;
    let end = start + doc[start..].find("```").expect("closed json block");
    let spec: kiln_types::WorkloadSpec = serde_json::from_str(&doc[start..end])
        .unwrap_or_else(|e| panic!("the example in workload-spec.md is not a WorkloadSpec: {e}"));
    assert!(spec.check_version().is_ok());
    fn paths(prefix: &str, v: &serde_json::Value, out: &mut BTreeSet<String>) {
        // `env` is a map of variable names, not a struct: its keys are data.
        if let (serde_json::Value::Object(m), false) = (v, prefix == "env") {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                let elem = match v {
                    serde_json::Value::Array(a) => a.first(),
                    other => Some(other),
                };
                if let Some(e) = elem {
                    let p = if v.is_array() { format!("{p}[]") } else { p };
                    paths(&p, e, out);
                }
            }
        }
    }
    let mut fields = BTreeSet::new();
    paths(
        "",
        &serde_json::to_value(&spec).expect("serialize"),
        &mut fields,
    );
    let documented: BTreeSet<String> = table_rows(&doc)
        .into_iter()
        .filter_map(|r| Some(r.first()?.strip_prefix('`')?.strip_suffix('`')?.to_owned()))
        .collect();
    let undocumented: Vec<_> = fields.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&fields).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "workload-spec.md field table differs from the WorkloadSpec:\n  not documented: \
         {undocumented:?}\n  documented but absent (or missing from the example): {stale:?}"
    );
}

/// (METHOD, path) of every `.route(...)` in the control plane's source.
fn routes_in_code() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let dir = root().join("crates/kiln-control/src");
    let mut files = vec![dir.clone()];
    let mut sources = Vec::new();
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(
                std::fs::read_dir(&p)
                    .expect("dir")
                    .map(|e| e.expect("entry").path()),
            );
        } else if p.extension().is_some_and(|e| e == "rs") {
            sources.push(read(&p));
        }
    }
    for src in sources {
        let mut rest = src.as_str();
        while let Some(i) = rest.find(".route(") {
            let args = &rest[i + 7..];
            let mut depth = 1;
            let mut end = 0;
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
                    let before = s[..k].chars().last();
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
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
fn http_api_docs_match_the_routes() {
    let code = routes_in_code();
    assert!(
        code.len() >= 5,
        "could not read the routes of kiln-control: {code:?}"
    );
    let doc = read(&docs_dir().join("specs/api/http-api.md"));
    let documented: BTreeSet<(String, String)> = table_rows(&doc)
        .into_iter()
        .filter_map(|r| {
            let method = r.first()?.clone();
            let path = r.get(1)?.strip_prefix('`')?.strip_suffix('`')?.to_owned();
            ["GET", "POST", "PUT", "PATCH", "DELETE"]
                .contains(&method.as_str())
                .then_some((method, path))
        })
        .collect();
    assert_eq!(
        documented, code,
        "the endpoint table of docs/specs/api/http-api.md (| METHOD | `path` | ...) must list \
         exactly the routes of crates/kiln-control"
    );
    let yaml = read(&docs_dir().join("specs/api/openapi.yaml"));
    let mut in_paths = false;
    let mut current = String::new();
    let mut openapi = BTreeSet::new();
    for line in yaml.lines() {
        if !line.starts_with(' ') && !line.starts_with('#') && !line.is_empty() {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            current = format!("/{}", p.trim_end().trim_end_matches(':').trim_matches('\''));
        } else if let Some(m) = line.strip_prefix("    ") {
            let m = m.trim_end().trim_end_matches(':');
            if ["get", "post", "put", "patch", "delete"].contains(&m) {
                openapi.insert((m.to_uppercase(), current.clone()));
            }
        }
    }
    assert_eq!(
        openapi, code,
        "docs/specs/api/openapi.yaml `paths` must cover exactly the routes of crates/kiln-control"
    );
}

/// No merge left its conflict markers in a document (a table with `<<<<<<<` still renders, so
/// nothing else would notice).
#[test]
fn no_document_holds_merge_conflict_markers() {
    let mut stack = vec![docs_dir()];
    let mut found = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for (n, line) in text.lines().enumerate() {
                if line.starts_with("<<<<<<< ") || line.starts_with(">>>>>>> ") || line == "======="
                {
                    found.push(format!("{}:{}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "conflict markers at:\n{}",
        found.join("\n")
    );
}
