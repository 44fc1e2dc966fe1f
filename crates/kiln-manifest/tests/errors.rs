//! What a user sees when a kiln.toml is wrong: every problem at once, in file order, each at the
//! line and column of the key or value it is about, saying what was expected, with a suggestion
//! for a misspelling.

use kiln_manifest::{parse, ManifestError};

fn problems(src: &str) -> ManifestError {
    parse("kiln.toml", src).expect_err("the manifest must be refused")
}

/// (line, column, message) of each problem.
fn lines(e: &ManifestError) -> Vec<(usize, usize, String)> {
    e.problems
        .iter()
        .map(|p| (p.line.unwrap(), p.column.unwrap(), p.message.clone()))
        .collect()
}

#[test]
fn a_misspelt_key_names_line_column_and_suggests_the_key() {
    let src = "app = \"x\"\n\n[[services]]\nprotocol = \"tls\"\ninternal_prot = 8443\n";
    let e = problems(src);
    let report = e.report();
    assert!(
        report.contains(
            "kiln.toml:5:1: unknown key `internal_prot` in `services[0]`; did you mean `internal_port`?"
        ),
        "{report}"
    );
    // The key it replaced is also missing, reported at the table's header.
    assert!(
        report.contains("kiln.toml:3:1: missing key `internal_port` in `services[0]`: expected an integer from 1 to 65535"),
        "{report}"
    );
}

#[test]
fn every_problem_is_reported_at_once_in_file_order() {
    let src = r#"app = "Bad_Name"
colour = "blue"

[[services]]
protocol = "tcp"
internal_port = 70000

[vm]
memory_mib = 100
cpus = "2"

[deploy]
health_timeout = "soon"
"#;
    let e = problems(src);
    let got: Vec<(usize, usize)> = lines(&e).iter().map(|(l, c, _)| (*l, *c)).collect();
    assert_eq!(
        got,
        vec![(1, 7), (2, 1), (6, 17), (9, 14), (10, 8), (13, 18)],
        "{}",
        e.report()
    );
    let msgs: Vec<String> = lines(&e).into_iter().map(|(_, _, m)| m).collect();
    assert!(
        msgs[0].starts_with("`app`: name \"Bad_Name\""),
        "{}",
        msgs[0]
    );
    assert!(
        msgs[1].contains("expected one of: app, image,"),
        "{}",
        msgs[1]
    );
    assert_eq!(
        msgs[2],
        "`services[0].internal_port`: expected an integer from 1 to 65535, found 70000"
    );
    assert_eq!(
        msgs[3],
        "`vm.memory_mib`: expected a multiple of 64 from 64 to 262144, found 100"
    );
    assert_eq!(
        msgs[4],
        "`vm.cpus`: expected an integer from 1 to 64, found \"2\""
    );
    assert!(msgs[5].contains("expected a duration like"), "{}", msgs[5]);
}

#[test]
fn misspelt_values_get_suggestions_too() {
    let e = problems(
        "app = \"x\"\nstop_signal = \"SIGTREM\"\n[[services]]\nprotocol = \"tsl\"\ninternal_port = 1\n",
    );
    let msgs: Vec<String> = lines(&e).into_iter().map(|(_, _, m)| m).collect();
    assert!(
        msgs[0].ends_with("did you mean \"SIGTERM\"?"),
        "{}",
        msgs[0]
    );
    assert!(msgs[1].ends_with("did you mean \"tls\"?"), "{}", msgs[1]);
}

#[test]
fn a_key_in_the_wrong_table_points_to_the_right_one() {
    let e = problems("app = \"x\"\nmemory_mib = 512\n");
    assert_eq!(
        lines(&e),
        vec![(
            2,
            1,
            "unknown key `memory_mib` at the top level; did you mean `vm.memory_mib`?".into()
        )]
    );
}

#[test]
fn syntax_errors_are_all_reported_with_positions() {
    let e = problems("app = \"x\"\nthis is not toml\n[vm]\ncpus = = 2\n");
    let got: Vec<usize> = lines(&e).iter().map(|(l, _, _)| *l).collect();
    assert!(got.contains(&2) && got.contains(&4), "{}", e.report());
    assert!(e
        .problems
        .iter()
        .all(|p| p.message.starts_with("invalid TOML")));
}

#[test]
fn columns_count_characters_not_bytes() {
    let e = problems("app = \"x\"\n[env]\nNAME = \"é\"\nBAD = 1\n");
    assert_eq!(lines(&e)[0].0, 4);
    assert_eq!(lines(&e)[0].1, 7);
    let e = problems("app = \"é\"\n");
    assert_eq!((lines(&e)[0].0, lines(&e)[0].1), (1, 7));
}

#[test]
fn values_are_checked() {
    let cases: &[(&str, &str)] = &[
        ("[vm]\nmemory_mib = 96\n", "multiple of 64"),
        ("[vm]\ncpu_kind = \"dedicated\"\n", "\"shared\", \"performance\""),
        ("[vm]\nread_only_root = \"yes\"\n", "vm.read_only_root"),
        ("stop_timeout = \"5\"\n", "expected a duration"),
        ("stop_timeout = \"25h\"\n", "from 0s to 24h"),
        ("primary_region = \"EU\"\n", "primary_region"),
        ("regions = [\"fra\"]\n", "include primary_region \"local\""),
        ("image = \"has space\"\n", "expected an image reference"),
        ("command = \"'unterminated\"\n", "unterminated quote"),
        ("command = []\n", "empty one"),
        ("[env]\n\"A-B\" = \"x\"\n", "not allowed"),
        ("[[services]]\nprotocol = \"tls\"\ninternal_port = 1\nports = [443]\n", "public ports are for tcp"),
        ("[[services]]\nprotocol = \"tcp\"\ninternal_port = 1\nhostnames = [\"a.example.com\"]\n", "hostnames are for tls"),
        ("[[services]]\nprotocol = \"tcp\"\ninternal_port = 1\nports = [0]\n", "port from 1 to 65535"),
        ("[[services]]\nprotocol = \"tls\"\ninternal_port = 1\nhostnames = [\"*.example.com\"]\n", "wildcard"),
        ("[[services]]\nprotocol = \"tls\"\ninternal_port = 1\n[[services]]\nprotocol = \"tls\"\ninternal_port = 1\n", "already used"),
        ("[[services]]\nprotocol = \"tls\"\ninternal_port = 1\nchecks = []\n", "at least one check"),
        ("[[services]]\nprotocol = \"tls\"\ninternal_port = 1\n[services.concurrency]\nsoft_limit = 10\nhard_limit = 5\n", "soft_limit ≤ hard_limit"),
        ("[[services]]\nprotocol = \"tls\"\ninternal_port = 1\n[[services.checks]]\nkind = \"exec\"\n", "missing key `command`"),
        ("[[services]]\nprotocol = \"tls\"\ninternal_port = 1\n[[services.checks]]\nkind = \"http\"\npath = \"healthz\"\n", "starting with '/'"),
        ("[[services]]\nprotocol = \"tls\"\ninternal_port = 1\n[[services.checks]]\ninterval = \"100ms\"\n", "from 1s to 1h"),
        ("[scale]\ncount = 1001\n", "from 0 to 1000"),
        ("[scale]\ncount = 2\nmin = 3\n", "min ≤ count ≤ max"),
        ("[[mounts]]\nvolume = \"data\"\npath = \"/proc/x\"\n", "outside /proc"),
        ("[[mounts]]\nvolume = \"data\"\npath = \"/a/../b\"\n", "without `.` or `..`"),
        ("[[mounts]]\nvolume = \"data\"\npath = \"/data\"\ninitial_size = \"1kb\"\n", "from 64mb to 16tb"),
        ("[[mounts]]\nvolume = \"a\"\npath = \"/data\"\n[[mounts]]\nvolume = \"b\"\npath = \"/data\"\n", "already mounted"),
        ("[deploy]\nmax_unavailable = 0\n", "a count from 1"),
        ("[metrics]\npath = \"/m\"\n", "missing key `port`"),
        ("[restart]\npolicy = \"sometimes\"\n", "\"always\", \"on-failure\", \"never\""),
        ("[processes]\n", "at least one process group"),
        ("[processes.Web]\n", "process group name"),
        ("services = 3\n", "array of tables"),
        ("vm = 3\n", "expected a table"),
    ];
    for (body, needle) in cases {
        let src = format!("app = \"x\"\n{body}");
        match parse("kiln.toml", &src) {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => assert!(
                e.report().contains(needle),
                "for\n{src}\nexpected a problem containing {needle:?}, got:\n{}",
                e.report()
            ),
        }
    }
}

#[test]
fn processes_exclude_top_level_command_and_services() {
    let src = "app = \"x\"\ncommand = \"a\"\n[[services]]\nprotocol = \"tls\"\ninternal_port = 1\n[processes.web]\n";
    let e = problems(src);
    let r = e.report();
    assert!(
        r.contains("kiln.toml:2:1: `command` at the top level cannot be combined with [processes]"),
        "{r}"
    );
    assert!(
        r.contains("`services` at the top level cannot be combined"),
        "{r}"
    );
}

#[test]
fn hostnames_and_ports_are_unique_across_groups() {
    let src = r#"app = "x"
[[processes.a.services]]
protocol = "tcp"
internal_port = 1
ports = [9000]
[[processes.b.services]]
protocol = "tcp"
internal_port = 1
ports = [9000]
"#;
    assert!(problems(src)
        .report()
        .contains("public port 9000 is routed to two services"));
}

#[test]
fn mounts_name_existing_groups() {
    let src = "app = \"x\"\n[processes.web]\n[processes.worker]\n[[mounts]]\nvolume = \"v\"\npath = \"/v\"\nprocesses = [\"wroker\"]\n";
    let r = problems(src).report();
    assert!(
        r.contains("no process group \"wroker\" (groups: web, worker); did you mean \"worker\"?"),
        "{r}"
    );
}

#[test]
fn huge_files_are_refused_without_parsing() {
    let src = format!(
        "app = \"x\"\n#{}\n",
        "a".repeat(kiln_manifest::MAX_SOURCE_BYTES)
    );
    let e = problems(&src);
    assert_eq!(e.problems.len(), 1);
    assert!(e.problems[0].line.is_none());
}
