//! `kiln login`, `kiln logout`, `kiln whoami` and `kiln tokens ...`.
//!
//! `kiln login` is an OAuth 2.0 device authorization grant (RFC 8628) client: it asks the control
//! plane for a device code, shows the user code and the verification URL, and polls the token
//! endpoint no faster than `interval`, adding 5 seconds on each `slow_down`, until the user
//! approves or denies in a browser or the code expires. The token it gets is saved as a context
//! (see `context.rs`), so one CLI holds sessions on several control planes and orgs.

use std::time::Duration;

use clap::{Args, Subcommand};

use kiln_api::{
    Client, CreateToken, DeviceCodeRequest, DeviceTokenRequest, OAuthError, TokenInfo,
    DEVICE_CODE_GRANT,
};

use crate::cmd::{client, format_ts, CliError};
use crate::context::{self, Context};
use crate::exit;

/// The `client_id` the CLI identifies itself with.
const CLIENT_ID: &str = "kiln-cli";

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Control-plane URL (default: the current context's).
    #[arg(long)]
    pub url: Option<String>,
    /// The org to sign in to, for users of several orgs (default: asked on the page, else the
    /// first).
    #[arg(long)]
    pub org: Option<String>,
    /// Name of the context to save (default: `<org>@<host:port>`).
    #[arg(long)]
    pub context: Option<String>,
}

#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// The context to log out of (default: the current one).
    #[arg(long)]
    pub context: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Create a token; its secret is printed once.
    Create {
        /// A name to recognise it by.
        #[arg(long, default_value = "cli")]
        name: String,
        /// A scope (repeat for several): admin, read, deploy, exec, host, edge, secrets:write.
        /// Default: the current token's scopes.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Restrict the token to one app (a CI deploy token).
        #[arg(long)]
        app: Option<String>,
        /// Lifetime: `30d`, `12h`, `90m`, `600s`, or `never` (not for tokens of a user).
        #[arg(long, default_value = "30d")]
        expires: String,
        /// Print JSON (with the secret) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their secrets).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id; it stops working immediately.
    Revoke { id: String },
}

/// `30d` → seconds; `never` → `None`.
pub(crate) fn parse_expiry(s: &str) -> Result<Option<u64>, String> {
    if s == "never" {
        return Ok(None);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid expiry {s:?}: expected e.g. 30d, 12h, 90m or never"))?;
    let mult = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        _ => return Err(format!("invalid expiry unit in {s:?}: use d, h, m or s")),
    };
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("invalid expiry {s:?}")),
        Some(v) => Ok(Some(v)),
    }
}

/// What to do after one poll of the token endpoint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Poll again after this many seconds.
    Wait(u64),
    /// Stop with this error.
    Stop(CliErrorKind),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CliErrorKind {
    Denied,
    Expired,
    Other(String),
}

/// RFC 8628 section 3.5: `authorization_pending` keeps the interval, `slow_down` adds 5 seconds
/// (or takes the server's new interval when it is larger), the rest end the login.
pub(crate) fn next_poll(interval: u64, e: &OAuthError) -> Next {
    match e.error.as_str() {
        "authorization_pending" => Next::Wait(interval),
        "slow_down" => Next::Wait(e.interval.unwrap_or(0).max(interval + 5)),
        "access_denied" => Next::Stop(CliErrorKind::Denied),
        "expired_token" => Next::Stop(CliErrorKind::Expired),
        other => Next::Stop(CliErrorKind::Other(format!(
            "{other}: {}",
            e.error_description.as_deref().unwrap_or("")
        ))),
    }
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

pub async fn login(args: LoginArgs) -> Result<(), CliError> {
    let mut file = context::load()?;
    let url = match &args.url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => file
            .current
            .as_ref()
            .and_then(|c| file.contexts.get(c))
            .map(|c| c.api.clone())
            .ok_or_else(|| {
                CliError::new(exit::USAGE, "no control plane to log in to")
                    .hint("pass --url, e.g. `kiln login --url http://127.0.0.1:4280`")
            })?,
    };
    let anon = Client::new(&url, "")?;
    let auth = anon
        .device_code(&DeviceCodeRequest {
            client_id: CLIENT_ID.into(),
            scope: None,
            org: args.org.clone(),
        })
        .await?;
    println!("Open {} and enter the code:", auth.verification_uri);
    println!();
    println!("    {}", auth.user_code);
    println!();
    println!("(or open {})", auth.verification_uri_complete);
    println!(
        "Waiting for approval; the code expires in {} minutes.",
        auth.expires_in.div_ceil(60)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(auth.expires_in);
    let mut interval = auth.interval.max(1);
    let token = loop {
        tokio::time::sleep(Duration::from_secs(interval)).await;
        let res = anon
            .device_token(&DeviceTokenRequest {
                grant_type: DEVICE_CODE_GRANT.into(),
                device_code: auth.device_code.clone(),
                client_id: CLIENT_ID.into(),
            })
            .await;
        let e = match res {
            Ok(Ok(token)) => break token,
            Ok(Err(e)) => e,
            // A control plane restarting for a moment is not the end of the login.
            Err(e) if e.is_unreachable() && tokio::time::Instant::now() < deadline => continue,
            Err(e) => return Err(e.into()),
        };
        let expired = || {
            CliError::new(exit::AUTH, "the login code expired before it was approved")
                .hint("run `kiln login` again and approve within the time shown")
        };
        match next_poll(interval, &e) {
            Next::Wait(secs) => {
                if secs != interval {
                    println!("The control plane asked to poll every {secs} s.");
                }
                interval = secs;
                // The server says `expired_token` at the deadline; this guards against one
                // that never does.
                if tokio::time::Instant::now() > deadline + Duration::from_secs(interval) {
                    return Err(expired());
                }
            }
            Next::Stop(CliErrorKind::Denied) => {
                return Err(CliError::new(exit::AUTH, "the login was denied")
                    .hint("run `kiln login` again; on the page, check the email and password"))
            }
            Next::Stop(CliErrorKind::Expired) => return Err(expired()),
            Next::Stop(CliErrorKind::Other(msg)) => {
                return Err(CliError::new(exit::AUTH, format!("login failed: {msg}")))
            }
        }
    };
    let ctx = Context {
        api: url.clone(),
        token: token.access_token,
        ..Default::default()
    };
    let me = client(&ctx)?.whoami().await?;
    let org = me.org_name.clone().unwrap_or_else(|| me.org_id.to_string());
    let email = me.user.as_ref().map(|u| u.email.clone());
    let name = args
        .context
        .clone()
        .unwrap_or_else(|| format!("{org}@{}", host_of(&url)));
    file.contexts.insert(
        name.clone(),
        Context {
            org: Some(org.clone()),
            user: email.clone(),
            ..ctx
        },
    );
    file.current = Some(name.clone());
    context::save(&file)?;
    println!(
        "Logged in to org {org} as {}{}; context {name:?} selected.",
        email.as_deref().unwrap_or("?"),
        me.role
            .map(|r| format!(" ({})", r.as_str()))
            .unwrap_or_default()
    );
    if let Some(at) = me.expires_at {
        println!("The token expires at {}.", format_ts(at));
    }
    Ok(())
}

pub async fn logout(args: LogoutArgs) -> Result<(), CliError> {
    let mut file = context::load()?;
    let name = args
        .context
        .clone()
        .or_else(|| file.current.clone())
        .ok_or_else(|| {
            CliError::new(exit::USAGE, "no context to log out of").hint("see `kiln context list`")
        })?;
    let ctx = file.contexts.get(&name).cloned().ok_or_else(|| {
        CliError::new(exit::NOT_FOUND, format!("no context named {name:?}"))
            .hint("see `kiln context list`")
    })?;
    let c = client(&ctx)?;
    match c.whoami().await {
        Ok(me) => match me.token_id {
            Some(id) => {
                c.revoke_token(&id).await?;
                println!("Revoked token {id}.");
            }
            None => println!("The control plane did not name the token; it was not revoked."),
        },
        // Already revoked or expired: nothing left to revoke.
        Err(kiln_api::ApiError::Api { status: 401, .. }) => {
            println!("The token was already revoked or expired.");
        }
        Err(e) => return Err(e.into()),
    }
    file.contexts.remove(&name);
    if file.current.as_deref() == Some(name.as_str()) {
        file.current = None;
    }
    context::save(&file)?;
    println!("Removed context {name:?}.");
    if file.current.is_none() && !file.contexts.is_empty() {
        println!("Pick another with `kiln context use NAME` (see `kiln context list`).");
    }
    Ok(())
}

pub async fn whoami() -> Result<(), CliError> {
    let ctx = context::current()?;
    let me = client(&ctx)?.whoami().await?;
    let org = me.org_name.as_deref().unwrap_or("?");
    println!("control plane: {}", ctx.api);
    println!("org:           {org} ({})", me.org_id);
    match (&me.user, me.role) {
        (Some(u), Some(role)) => println!("user:          {} ({})", u.email, role.as_str()),
        (Some(u), None) => println!("user:          {} (no longer a member)", u.email),
        _ => println!("user:          - (a machine token)"),
    }
    println!(
        "token:         {:?}{}",
        me.token_name,
        me.token_id
            .as_ref()
            .map(|t| format!(" ({t})"))
            .unwrap_or_default()
    );
    println!("scopes:        {}", me.scopes.join(", "));
    if let Some(app) = &me.app {
        println!("app:           {app} only");
    }
    println!(
        "expires:       {}",
        me.expires_at.map_or_else(|| "never".into(), format_ts)
    );
    Ok(())
}

fn print_tokens(tokens: &[TokenInfo]) {
    println!(
        "{:<26} {:<16} {:<28} {:<10} {:<24} {:<24} STATE",
        "ID", "NAME", "SCOPES", "APP", "EXPIRES", "LAST USED"
    );
    for t in tokens {
        let state = if t.revoked_at.is_some() {
            "revoked"
        } else if t.expires_at.is_some_and(|e| e <= kiln_types::now_millis()) {
            "expired"
        } else {
            "active"
        };
        println!(
            "{:<26} {:<16} {:<28} {:<10} {:<24} {:<24} {state}",
            t.id,
            t.name,
            t.scopes.join(","),
            t.app.as_ref().map_or("-", |a| a.as_str()),
            t.expires_at.map_or_else(|| "never".into(), format_ts),
            t.last_used_at.map_or_else(|| "-".into(), format_ts),
        );
    }
}

pub async fn tokens(cmd: TokensCmd) -> Result<(), CliError> {
    let c = client(&context::current()?)?;
    match cmd {
        TokensCmd::Create {
            name,
            scopes,
            app,
            expires,
            json,
        } => {
            let expiry = parse_expiry(&expires).map_err(|m| CliError::new(exit::USAGE, m))?;
            let app = app
                .map(|a| {
                    a.parse()
                        .map_err(|e| CliError::new(exit::USAGE, format!("invalid app name: {e}")))
                })
                .transpose()?;
            let created = c
                .create_token(&CreateToken {
                    name,
                    scopes,
                    app,
                    expires_in_secs: expiry,
                    no_expiry: expiry.is_none(),
                })
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&created).unwrap_or_default()
                );
            } else {
                let t = &created.token;
                println!(
                    "Created token {} ({:?}), scopes {}{}, expires {}.",
                    t.id,
                    t.name,
                    t.scopes.join(", "),
                    t.app
                        .as_ref()
                        .map(|a| format!(", app {a} only"))
                        .unwrap_or_default(),
                    t.expires_at.map_or_else(|| "never".into(), format_ts)
                );
                println!("Its secret, shown only now:");
                println!("{}", created.secret);
            }
            Ok(())
        }
        TokensCmd::List { json } => {
            let tokens = c.list_tokens().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&tokens).unwrap_or_default()
                );
            } else {
                print_tokens(&tokens);
            }
            Ok(())
        }
        TokensCmd::Revoke { id } => {
            let id: kiln_types::TokenId = id.parse().map_err(|e| {
                CliError::new(exit::USAGE, format!("{e}")).hint("see `kiln tokens list`")
            })?;
            let t = c.revoke_token(&id).await?;
            println!("Revoked token {} ({:?}).", t.id, t.name);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(error: &str, interval: Option<u64>) -> OAuthError {
        OAuthError {
            error: error.into(),
            error_description: None,
            interval,
        }
    }

    #[test]
    fn polling_honours_pending_slow_down_and_the_end_states() {
        assert_eq!(
            next_poll(5, &err("authorization_pending", None)),
            Next::Wait(5)
        );
        assert_eq!(next_poll(5, &err("slow_down", None)), Next::Wait(10));
        assert_eq!(next_poll(10, &err("slow_down", Some(7))), Next::Wait(15));
        assert_eq!(next_poll(5, &err("slow_down", Some(30))), Next::Wait(30));
        assert_eq!(
            next_poll(5, &err("access_denied", None)),
            Next::Stop(CliErrorKind::Denied)
        );
        assert_eq!(
            next_poll(5, &err("expired_token", None)),
            Next::Stop(CliErrorKind::Expired)
        );
        assert!(matches!(
            next_poll(5, &err("invalid_grant", None)),
            Next::Stop(CliErrorKind::Other(_))
        ));
    }

    #[test]
    fn expiries_parse() {
        assert_eq!(parse_expiry("30d"), Ok(Some(30 * 86_400)));
        assert_eq!(parse_expiry("12h"), Ok(Some(12 * 3_600)));
        assert_eq!(parse_expiry("90m"), Ok(Some(5_400)));
        assert_eq!(parse_expiry("600"), Ok(Some(600)));
        assert_eq!(parse_expiry("never"), Ok(None));
        for bad in ["", "0d", "d", "3w", "-1d", "99999999999999999999d"] {
            assert!(parse_expiry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn context_names_use_the_host() {
        assert_eq!(host_of("http://127.0.0.1:4280"), "127.0.0.1:4280");
        assert_eq!(host_of("https://kiln.example.com/x"), "kiln.example.com");
    }
}
