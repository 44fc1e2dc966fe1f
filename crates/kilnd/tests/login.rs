//! `kiln login`, `whoami`, `tokens`, `context` and `logout` as a user runs them: the real `kiln`
//! binary against a control plane served in-process over real HTTP on 127.0.0.1:0, with the
//! user made by the real `kilnd control users create`. The test approves (or denies) each login
//! through the verification page's HTML form, as a browser would, while the CLI process polls;
//! expiry is reached by moving the control plane's test clock, not by sleeping.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kiln_control::{Clock, Control, ControlConfig};

const PASSWORD: &str = "a long enough password";

struct Env {
    _control: std::sync::Arc<Control>,
    clock: Clock,
    base: String,
    admin: String,
    dir: tempfile::TempDir,
    kiln: PathBuf,
}

impl Env {
    async fn start() -> Env {
        let kiln = tokio::task::spawn_blocking(kiln_testkit::dev::build_cli)
            .await
            .unwrap()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = kiln_store::Store::open_sqlite(&dir.path().join("kiln.db"))
            .await
            .unwrap();
        let clock = Clock::default();
        let control = Control::new(
            store,
            ControlConfig {
                clock: clock.clone(),
                device_poll_interval: Duration::from_secs(1),
                device_code_ttl: Duration::from_secs(60),
                ..Default::default()
            },
        )
        .unwrap();
        let admin = control.bootstrap("dev").await.unwrap().unwrap().admin_token;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = control.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Env {
            _control: control,
            clock,
            base: format!("http://{addr}"),
            admin,
            dir,
            kiln,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("cli.toml")
    }

    fn kiln_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kiln);
        c.args(args)
            .current_dir(self.dir.path())
            .env("KILN_CONFIG", self.config())
            .env_remove("KILN_API_URL")
            .env_remove("KILN_TOKEN")
            .stdin(Stdio::null());
        c
    }

    /// Runs `kiln ARGS` to completion (off the async runtime).
    async fn kiln(&self, args: &[&str]) -> Output {
        let mut cmd = self.kiln_cmd(args);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// `kiln login ...` running in the background, and the user code it printed.
    async fn start_login(&self, extra: &[&str]) -> (Child, mpsc::Receiver<String>, String) {
        let mut args = vec!["login", "--url", &self.base];
        args.extend_from_slice(extra);
        let mut child = self
            .kiln_cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let (rx, code) = tokio::task::spawn_blocking(move || loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("kiln login printed no user code");
            let t = line.trim();
            if t.len() == 9 && t.as_bytes()[4] == b'-' {
                return (rx, t.to_owned());
            }
        })
        .await
        .unwrap();
        (child, rx, code)
    }

    /// Sends the verification form as a browser does (GET the page, POST with its cookie).
    async fn submit(&self, user_code: &str, email: &str, password: &str, action: &str) -> u16 {
        let http = reqwest::Client::new();
        let page = http
            .get(format!("{}/v1/device?user_code={user_code}", self.base))
            .send()
            .await
            .unwrap();
        let cookie = page.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let html = page.text().await.unwrap();
        let csrf = html
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_owned();
        http.post(format!("{}/v1/device", self.base))
            .header("cookie", cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("user_code", user_code),
                ("email", email),
                ("password", password),
                ("action", action),
            ])
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

/// Waits for a child to exit (off the runtime) and returns its code, stdout lines and stderr.
async fn finish(mut child: Child, lines: mpsc::Receiver<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        let out: Vec<String> = lines.iter().collect();
        (status.code().unwrap_or(-1), out.join("\n"), err)
    })
    .await
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kilnd control users create` with the password on stdin.
fn create_user(data_dir: &Path, email: &str, org: &str, role: &str, password: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .args([
            "control", "users", "create", email, "--org", org, "--role", role,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_whoami_tokens_contexts_and_logout() {
    let env = Env::start().await;
    let data = env.dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        create_user(&data, "Ada@Example.com", "dev", "member", PASSWORD)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("email=ada@example.com"));
    let data = env.dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        create_user(&data, "x@example.com", "dev", "superuser", PASSWORD)
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown role"));

    // Log in: the CLI polls while the user approves on the page.
    let (child, lines, code) = env.start_login(&[]).await;
    assert_eq!(
        env.submit(&code.to_lowercase(), "ada@example.com", PASSWORD, "approve")
            .await,
        200
    );
    let (status, out, err) = finish(child, lines).await;
    assert_eq!(status, 0, "{out}\n{err}");
    assert!(
        out.contains("Logged in to org dev as ada@example.com (member)"),
        "{out}"
    );
    let config = std::fs::read_to_string(env.config()).unwrap();
    assert!(config.contains("kiln_"), "the token is in the context file");
    let host = env.base.trim_start_matches("http://");
    let login_ctx = format!("dev@{host}");
    assert!(config.contains(&login_ctx), "{config}");

    let out = env.kiln(&["whoami"]).await;
    let who = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        who.contains("user:          ada@example.com (member)"),
        "{who}"
    );
    assert!(who.contains("org:           dev"), "{who}");
    assert!(
        who.contains("scopes:        read, deploy, exec, secrets:write"),
        "{who}"
    );
    assert!(!who.contains("expires:       never"), "{who}");

    // A CI token for one app, made by the user, listed and revoked.
    kiln_api::Client::new(&env.base, &env.admin)
        .unwrap()
        .create_app(&"web".parse().unwrap())
        .await
        .unwrap();
    let out = env
        .kiln(&[
            "tokens",
            "create",
            "--name",
            "ci-web",
            "--scope",
            "deploy",
            "--app",
            "web",
            "--expires",
            "1d",
        ])
        .await;
    let created = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(created.contains("app web only"), "{created}");
    let secret = created.lines().last().unwrap().trim().to_owned();
    assert!(secret.starts_with("kiln_"));
    let out = env.kiln(&["tokens", "list", "--json"]).await;
    let listed: Vec<kiln_api::TokenInfo> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 2, "the login token and the CI token");
    assert!(!text(&out.stdout).contains(&secret));
    let ci = listed.iter().find(|t| t.name == "ci-web").unwrap();
    let out = env.kiln(&["tokens", "revoke", ci.id.as_str()]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = kiln_api::Client::new(&env.base, &secret)
        .unwrap()
        .list_apps()
        .await
        .unwrap_err();
    assert!(matches!(err, kiln_api::ApiError::Api { status: 401, .. }));
    // A scope the member does not have cannot be granted: exit code 5 (auth).
    let out = env.kiln(&["tokens", "create", "--scope", "admin"]).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));

    // Two contexts, switch between them.
    let out = env
        .kiln(&[
            "context", "add", "ops", "--api", &env.base, "--token", &env.admin,
        ])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = env.kiln(&["context", "list"]).await;
    let list = text(&out.stdout);
    assert!(list.contains("* ops"), "{list}");
    assert!(list.contains(&format!("  {login_ctx}")), "{list}");
    assert!(list.contains("user=ada@example.com"), "{list}");
    let out = env.kiln(&["whoami"]).await;
    assert!(text(&out.stdout).contains("a machine token"));
    let out = env.kiln(&["context", "use", &login_ctx]).await;
    assert!(out.status.success());

    // Logout revokes the token on the server and removes the context.
    let token = {
        let file: toml::Value =
            toml::from_str(&std::fs::read_to_string(env.config()).unwrap()).unwrap();
        file["contexts"][&login_ctx]["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let out = env.kiln(&["logout"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = kiln_api::Client::new(&env.base, &token)
        .unwrap()
        .whoami()
        .await
        .unwrap_err();
    assert!(matches!(err, kiln_api::ApiError::Api { status: 401, .. }));
    let config = std::fs::read_to_string(env.config()).unwrap();
    assert!(!config.contains(&token));
    assert!(config.contains("[contexts.ops]"), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_ends_on_deny_on_expiry_and_on_a_wrong_password_limit() {
    let env = Env::start().await;
    let data = env.dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        create_user(&data, "bob@example.com", "dev", "viewer", PASSWORD)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Denied on the page.
    let (child, lines, code) = env.start_login(&[]).await;
    assert_eq!(env.submit(&code, "", "", "deny").await, 200);
    let (status, out, err) = finish(child, lines).await;
    assert_eq!(status, 5, "{out}\n{err}");
    assert!(err.contains("denied"), "{err}");

    // Expired: the control plane's clock passes the code's 60 s while the CLI polls.
    let (child, lines, _code) = env.start_login(&[]).await;
    env.clock.advance(Duration::from_secs(61));
    let (status, out, err) = finish(child, lines).await;
    assert_eq!(status, 5, "{out}\n{err}");
    assert!(err.contains("expired"), "{err}");

    // Wrong password five times: the login is cancelled.
    let (child, lines, code) = env.start_login(&[]).await;
    for _ in 0..5 {
        assert_eq!(
            env.submit(&code, "bob@example.com", "wrong!", "approve")
                .await,
            401
        );
    }
    let (status, _, err) = finish(child, lines).await;
    assert_eq!(status, 5);
    assert!(err.contains("denied"), "{err}");
    assert!(!std::fs::read_to_string(env.config())
        .unwrap_or_default()
        .contains("kiln_"));
}
