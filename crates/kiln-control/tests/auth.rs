//! Users, tokens and the device login over real HTTP: a real SQLite store, the real router on
//! 127.0.0.1:0, the typed client for the API and plain form posts for the verification page, as
//! a browser sends them. Time-dependent rules (expiry, polling interval) run on the control
//! plane's test clock, moved forward instead of slept.

use std::time::Duration;

use kiln_api::{Client, CreateToken, DeviceCodeRequest, DeviceTokenRequest, DEVICE_CODE_GRANT};
use kiln_control::{Clock, Control, ControlConfig, NewUser};
use kiln_types::event::Role;

const PASSWORD: &str = "correct horse battery staple";

struct Env {
    control: std::sync::Arc<Control>,
    clock: Clock,
    base: String,
    admin: String,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

async fn start() -> Env {
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
    let admin = control
        .bootstrap("acme")
        .await
        .unwrap()
        .unwrap()
        .admin_token;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = control.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Env {
        control,
        clock,
        base: format!("http://{addr}"),
        admin,
        dir,
        http: reqwest::Client::new(),
    }
}

impl Env {
    fn client(&self, token: &str) -> Client {
        Client::new(&self.base, token).unwrap()
    }

    async fn user(&self, email: &str, org: &str, role: Role) {
        self.control
            .create_user(NewUser {
                email: email.into(),
                password: PASSWORD.into(),
                org: org.into(),
                role,
            })
            .await
            .unwrap();
    }

    async fn start_login(&self) -> kiln_api::DeviceAuthorization {
        self.client("")
            .device_code(&DeviceCodeRequest {
                client_id: "kiln-cli".into(),
                scope: None,
                org: None,
            })
            .await
            .unwrap()
    }

    async fn poll(&self, device_code: &str) -> Result<kiln_api::DeviceAccessToken, String> {
        self.client("")
            .device_token(&DeviceTokenRequest {
                grant_type: DEVICE_CODE_GRANT.into(),
                device_code: device_code.into(),
                client_id: "kiln-cli".into(),
            })
            .await
            .unwrap()
            .map_err(|e| e.error)
    }

    /// Opens the verification page as a browser does: returns the CSRF cookie and form field.
    async fn open_page(&self, user_code: &str) -> (String, String, String) {
        let resp = self
            .http
            .get(format!("{}/v1/device?user_code={user_code}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let cookie = resp
            .headers()
            .get("set-cookie")
            .unwrap()
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        assert!(cookie.starts_with("kiln_csrf="));
        let html = resp.text().await.unwrap();
        let csrf = html
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_owned();
        (cookie, csrf, html)
    }

    /// Submits the verification form; returns the status and the page.
    async fn submit(&self, cookie: Option<&str>, fields: &[(&str, &str)]) -> (u16, String) {
        let mut rb = self
            .http
            .post(format!("{}/v1/device", self.base))
            .form(fields);
        if let Some(c) = cookie {
            rb = rb.header("cookie", c);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    async fn approve(&self, user_code: &str, email: &str, password: &str) -> (u16, String) {
        let (cookie, csrf, _) = self.open_page(user_code).await;
        self.submit(
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("user_code", user_code),
                ("email", email),
                ("password", password),
                ("action", "approve"),
            ],
        )
        .await
    }
}

#[tokio::test]
async fn device_login_end_to_end_with_slow_down_and_a_user_token() {
    let env = start().await;
    env.user("Ada@Example.com", "acme", Role::Member).await;
    let auth = env.start_login().await;
    assert_eq!(auth.interval, 1);
    assert_eq!(auth.expires_in, 60);
    assert!(auth.verification_uri.ends_with("/v1/device"));
    assert!(auth
        .verification_uri_complete
        .ends_with(&format!("?user_code={}", auth.user_code)));
    assert_eq!(auth.user_code.len(), 9, "{}", auth.user_code);

    // Pending, then too fast: slow_down adds 5 s to the interval for every later poll.
    assert_eq!(
        env.poll(&auth.device_code).await.unwrap_err(),
        "authorization_pending"
    );
    let fast = env
        .client("")
        .device_token(&DeviceTokenRequest {
            grant_type: DEVICE_CODE_GRANT.into(),
            device_code: auth.device_code.clone(),
            client_id: "kiln-cli".into(),
        })
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!((fast.error.as_str(), fast.interval), ("slow_down", Some(6)));
    env.clock.advance(Duration::from_secs(2));
    assert_eq!(
        env.poll(&auth.device_code).await.unwrap_err(),
        "slow_down",
        "2 s < 6 s"
    );
    env.clock.advance(Duration::from_secs(12));
    assert_eq!(
        env.poll(&auth.device_code).await.unwrap_err(),
        "authorization_pending"
    );

    // The page: wrong password first, then the right one, with the code typed in lowercase.
    let (status, page) = env
        .approve(&auth.user_code, "ada@example.com", "wrong password!")
        .await;
    assert_eq!(status, 401, "{page}");
    assert!(page.contains("Wrong email or password"));
    let (status, page) = env
        .approve(&auth.user_code.to_lowercase(), "ada@example.com", PASSWORD)
        .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Signed in to the org acme as ada@example.com (member)"));

    env.clock.advance(Duration::from_secs(12));
    let token = env.poll(&auth.device_code).await.unwrap();
    assert!(token.access_token.starts_with("kiln_"));
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(token.scope, "read deploy exec secrets:write");
    assert_eq!(token.expires_in, 7 * 24 * 3600);
    // The code is spent.
    assert_eq!(
        env.poll(&auth.device_code).await.unwrap_err(),
        "invalid_grant"
    );

    let me = env.client(&token.access_token).whoami().await.unwrap();
    assert_eq!(me.org_name.as_deref(), Some("acme"));
    assert_eq!(me.user.as_ref().unwrap().email, "ada@example.com");
    assert_eq!(me.role, Some(Role::Member));
    assert!(me.expires_at.is_some());
    // A member can deploy but not mint an admin token.
    let err = env
        .client(&token.access_token)
        .create_token(&CreateToken {
            name: "escalate".into(),
            scopes: vec!["admin".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("insufficient_scope"));
    // Tokens of a user always expire.
    let err = env
        .client(&token.access_token)
        .create_token(&CreateToken {
            name: "forever".into(),
            no_expiry: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("expiry_required"));

    // The store holds the argon2 hash and never the password.
    drop(env.control.clone());
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(env.dir.path()).unwrap() {
        bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let hay = String::from_utf8_lossy(&bytes);
    assert!(hay.contains("$argon2id$v=19$"), "the hash is stored");
    assert!(!hay.contains(PASSWORD), "the password is not");
    assert!(!hay.contains("wrong password!"));
    assert!(
        !hay.contains(&token.access_token),
        "token secrets are not stored"
    );
}

#[tokio::test]
async fn the_page_refuses_forged_forms_and_counts_wrong_passwords() {
    let env = start().await;
    env.user("bob@example.com", "acme", Role::Viewer).await;
    let auth = env.start_login().await;
    let (_, csrf, html) = env.open_page(&auth.user_code).await;
    assert!(html.contains(&format!("value=\"{}\"", auth.user_code)));
    let fields = [
        ("csrf", csrf.as_str()),
        ("user_code", auth.user_code.as_str()),
        ("email", "bob@example.com"),
        ("password", PASSWORD),
        ("action", "approve"),
    ];
    // No cookie (a cross-site post), or a cookie that does not match: refused.
    assert_eq!(env.submit(None, &fields).await.0, 403);
    assert_eq!(env.submit(Some("kiln_csrf=other"), &fields).await.0, 403);
    assert_eq!(
        env.poll(&auth.device_code).await.unwrap_err(),
        "authorization_pending"
    );

    // Five wrong passwords end this authorization.
    for i in 0..5 {
        let (status, page) = env
            .approve(&auth.user_code, "bob@example.com", "not it at all")
            .await;
        assert_eq!(status, 401, "attempt {i}: {page}");
    }
    assert_eq!(
        env.poll(&auth.device_code).await.unwrap_err(),
        "access_denied"
    );
    // Even the right password cannot revive it.
    let (status, _) = env
        .approve(&auth.user_code, "bob@example.com", PASSWORD)
        .await;
    assert_eq!(status, 400);

    // An unknown email costs the same and says the same.
    let auth = env.start_login().await;
    let (status, page) = env
        .approve(&auth.user_code, "nobody@example.com", PASSWORD)
        .await;
    assert_eq!(status, 401);
    assert!(page.contains("Wrong email or password"));

    // Deny ends the login.
    let (cookie, csrf, _) = env.open_page(&auth.user_code).await;
    let (status, _) = env
        .submit(
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("user_code", &auth.user_code),
                ("action", "deny"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        env.poll(&auth.device_code).await.unwrap_err(),
        "access_denied"
    );
    let _ = cookie;
}

#[tokio::test]
async fn device_codes_expire() {
    let env = start().await;
    env.user("eve@example.com", "acme", Role::Admin).await;
    let auth = env.start_login().await;
    env.clock.advance(Duration::from_secs(61));
    let (status, page) = env
        .approve(&auth.user_code, "eve@example.com", PASSWORD)
        .await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("unknown, used or expired"));
    assert_eq!(
        env.poll(&auth.device_code).await.unwrap_err(),
        "expired_token"
    );
}

#[tokio::test]
async fn app_scoped_revoked_and_expired_tokens() {
    let env = start().await;
    let admin = env.client(&env.admin);
    for app in ["web", "api"] {
        admin.create_app(&app.parse().unwrap()).await.unwrap();
    }
    // A CI deploy token for `web` only.
    let ci = admin
        .create_token(&CreateToken {
            name: "ci-web".into(),
            scopes: vec!["deploy".into(), "read".into()],
            app: Some("web".parse().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(ci.secret.starts_with("kiln_"));
    // App-scoped tokens never carry org-wide or infrastructure scopes; by default read + deploy.
    for scope in ["admin", "host", "edge"] {
        let err = admin
            .create_token(&CreateToken {
                name: "bad".into(),
                scopes: vec![scope.into()],
                app: Some("web".parse().unwrap()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("invalid_scope"), "{scope}");
    }
    let default = admin
        .create_token(&CreateToken {
            name: "ci-default".into(),
            app: Some("web".parse().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(default.token.scopes, ["read", "deploy"]);
    assert_eq!(ci.token.app.as_ref().map(|a| a.as_str()), Some("web"));
    let ci_client = env.client(&ci.secret);
    assert!(ci_client.status("web").await.is_ok());
    let err = ci_client.status("api").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some("not_found"),
        "another app does not exist for it"
    );
    let apps = ci_client.list_apps().await.unwrap();
    assert_eq!(apps.len(), 1);
    let err = ci_client
        .create_app(&"other".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("app_scoped_token"));
    // It cannot mint tokens (not a user's, not admin).
    let err = ci_client
        .create_token(&CreateToken {
            name: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("insufficient_scope"));
    // It sees only itself.
    let mine = ci_client.list_tokens().await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].id, ci.token.id);

    // Revoked: refused on the very next request.
    let revoked = admin.revoke_token(&ci.token.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    let err = ci_client.status("web").await.unwrap_err();
    assert!(
        matches!(err, kiln_api::ApiError::Api { status: 401, .. }),
        "{err:?}"
    );

    // Expired: a 60 s token refused once the clock passes it.
    let short = admin
        .create_token(&CreateToken {
            name: "short".into(),
            scopes: vec!["read".into()],
            expires_in_secs: Some(60),
            ..Default::default()
        })
        .await
        .unwrap();
    let short_client = env.client(&short.secret);
    assert!(short_client.list_apps().await.is_ok());
    env.clock.advance(Duration::from_secs(61));
    let err = short_client.list_apps().await.unwrap_err();
    let kiln_api::ApiError::Api { status, problem } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 401);
    assert!(problem.detail.as_deref().unwrap().contains("expired"));

    // Scope names are checked.
    let err = admin
        .create_token(&CreateToken {
            name: "bad".into(),
            scopes: vec!["root".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_scope"));
    // An unknown token id answers 404.
    let err = admin
        .revoke_token(&kiln_types::TokenId::generate())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
}

#[tokio::test]
async fn last_use_is_recorded_at_most_once_a_minute() {
    let env = start().await;
    let admin = env.client(&env.admin);
    let store = env.control.store().clone();
    let used_events = || async {
        let events = store.read_after(0, 10_000).await.unwrap();
        events
            .iter()
            .filter(|e| e.event.type_name() == "token_used")
            .count()
    };
    let mut head = store.subscribe();
    for _ in 0..20 {
        admin.list_apps().await.unwrap();
    }
    // The append is in the background: wait for it through the log's head.
    tokio::time::timeout(Duration::from_secs(5), async {
        while used_events().await == 0 {
            head.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(used_events().await, 1, "20 requests, one event");
    let tokens = admin.list_tokens().await.unwrap();
    let me = tokens.iter().find(|t| t.name == "admin").unwrap();
    assert!(me.last_used_at.is_some());

    env.clock.advance(Duration::from_secs(61));
    admin.list_apps().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while used_events().await < 2 {
            head.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(used_events().await, 2);
}

#[tokio::test]
async fn tokens_of_another_org_do_not_exist_for_a_caller() {
    let env = start().await;
    let store = env.control.store().clone();
    let other = kiln_types::OrgId::generate();
    store
        .append(kiln_store::Append {
            events: vec![kiln_store::NewEvent::any(
                kiln_types::event::Event::OrgCreated {
                    org_id: other.clone(),
                    name: "globex".into(),
                },
            )],
            metadata: Default::default(),
            idempotency: None,
        })
        .await
        .unwrap();
    let theirs = env
        .control
        .create_token(&other, "globex-admin", &[kiln_control::Scope::Admin])
        .await
        .unwrap();
    let theirs = env.client(&theirs);
    let ours = env.client(&env.admin);
    let our_tokens = ours.list_tokens().await.unwrap();
    let their_tokens = theirs.list_tokens().await.unwrap();
    assert_eq!(our_tokens.len(), 1);
    assert_eq!(their_tokens.len(), 1);
    assert_ne!(our_tokens[0].id, their_tokens[0].id);
    let err = theirs.revoke_token(&our_tokens[0].id).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
    assert!(ours.whoami().await.is_ok(), "still valid");
}
