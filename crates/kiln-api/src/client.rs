//! The typed client for the control plane's API.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use kiln_types::{HostId, InstanceId};

use crate::types::*;

/// A call to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The control plane answered with an error (`problem.code` says which).
    #[error("{} ({}): {}", problem.title, problem.code, problem.detail.as_deref().unwrap_or(""))]
    Api { status: u16, problem: Box<Problem> },
    #[error("cannot reach the control plane at {url}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the control plane's answer to {path} could not be read")]
    Decode {
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("WebSocket to {url} failed")]
    WebSocket {
        url: String,
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("invalid control-plane URL {url:?}")]
    BadUrl { url: String },
}

impl ApiError {
    /// The stable error code, when the control plane answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Api { problem, .. } => Some(&problem.code),
            _ => None,
        }
    }

    /// True when the request never got an answer (retrying later may help).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ApiError::Connect { .. })
    }
}

/// A client WebSocket (plain TCP to the control plane).
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A stream of log lines (JSON lines on the wire).
pub struct LogStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    path: String,
}

impl LogStream {
    /// The next line, or `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<LogRecord>, ApiError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.len() <= 1 {
                    continue;
                }
                match serde_json::from_slice::<LogRecord>(&line) {
                    Ok(r) => return Ok(Some(r)),
                    // Keep-alive or unknown lines are skipped.
                    Err(_) => continue,
                }
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return Ok(None),
                Err(source) => {
                    return Err(ApiError::Decode {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }
}

/// A client bound to one control plane and one token. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Client")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(base_url: &str, token: &str) -> Result<Self, ApiError> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ApiError::BadUrl {
                url: base_url.to_owned(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|source| ApiError::Connect {
                url: base.clone(),
                source,
            })?;
        Ok(Self {
            http,
            base,
            token: token.to_owned(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub(crate) fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
    }

    pub(crate) async fn send<T: DeserializeOwned>(
        &self,
        path: &str,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, ApiError> {
        let resp = rb.send().await.map_err(|source| ApiError::Connect {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return resp.json().await.map_err(|source| ApiError::Decode {
                path: path.to_owned(),
                source,
            });
        }
        Err(problem_of(resp).await)
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.send(path, self.req(reqwest::Method::GET, path)).await
    }

    pub(crate) async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        idem: Option<&str>,
    ) -> Result<T, ApiError> {
        let mut rb = self.req(reqwest::Method::POST, path).json(body);
        if let Some(key) = idem {
            rb = rb.header(IDEMPOTENCY_KEY, key);
        }
        self.send(path, rb).await
    }

    /// The caller's org's quotas and usage.
    pub async fn own_quotas(&self) -> Result<crate::OrgQuotas, ApiError> {
        self.get("/v1/quotas").await
    }

    /// An org's quotas and usage (operator tokens).
    pub async fn org_quotas(&self, org: &str) -> Result<crate::OrgQuotas, ApiError> {
        self.get(&format!("/v1/orgs/{org}/quotas")).await
    }

    /// Replaces an org's quota overrides (operator tokens).
    pub async fn set_org_quotas(
        &self,
        org: &str,
        overrides: &kiln_types::event::QuotaOverrides,
    ) -> Result<crate::OrgQuotas, ApiError> {
        let path = format!("/v1/orgs/{org}/quotas");
        let rb = self.req(reqwest::Method::PUT, &path).json(overrides);
        self.send(&path, rb).await
    }

    pub async fn whoami(&self) -> Result<WhoAmI, ApiError> {
        self.get("/v1/whoami").await
    }

    pub async fn create_app(&self, name: &kiln_types::AppName) -> Result<App, ApiError> {
        self.post("/v1/apps", &CreateApp { name: name.clone() }, None)
            .await
    }

    /// Every app of the token's org, following the pages.
    pub async fn list_apps(&self) -> Result<Vec<App>, ApiError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page: AppPage = self.get(&page_path("/v1/apps", cursor.as_deref())).await?;
            out.extend(page.items);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// One page of an app's releases, oldest first.
    pub async fn list_releases(
        &self,
        app: &str,
        cursor: Option<&str>,
    ) -> Result<ReleasePage, ApiError> {
        self.get(&page_path(&format!("/v1/apps/{app}/releases"), cursor))
            .await
    }

    /// One page of an app's instances.
    pub async fn list_instances(
        &self,
        app: &str,
        cursor: Option<&str>,
    ) -> Result<InstancePage, ApiError> {
        self.get(&page_path(&format!("/v1/apps/{app}/instances"), cursor))
            .await
    }

    /// One page of the registered hosts (operator tokens).
    pub async fn list_hosts(&self, cursor: Option<&str>) -> Result<HostPage, ApiError> {
        self.get(&page_path("/v1/hosts", cursor)).await
    }

    /// One page of the org's events after `cursor` (from the start without one).
    pub async fn events(&self, cursor: Option<&str>) -> Result<EventPage, ApiError> {
        self.get(&page_path("/v1/events", cursor)).await
    }

    pub async fn create_release(
        &self,
        app: &str,
        body: &CreateRelease,
        idempotency_key: &str,
    ) -> Result<Release, ApiError> {
        self.post(
            &format!("/v1/apps/{app}/releases"),
            body,
            Some(idempotency_key),
        )
        .await
    }

    pub async fn release(&self, app: &str, version: u64) -> Result<Release, ApiError> {
        self.get(&format!("/v1/apps/{app}/releases/{version}"))
            .await
    }

    pub async fn heartbeat(&self, host: &HostId) -> Result<(), ApiError> {
        let _: serde_json::Value = self
            .post(
                &format!("/v1/hosts/{host}/heartbeat"),
                &serde_json::json!({}),
                None,
            )
            .await?;
        Ok(())
    }

    /// Drains (`drain: true`) or undrains a host, by id or name.
    pub async fn drain_host(&self, host: &str, drain: bool) -> Result<Host, ApiError> {
        let action = if drain { "drain" } else { "ready" };
        self.post(
            &format!("/v1/hosts/{host}/{action}"),
            &serde_json::json!({}),
            None,
        )
        .await
    }

    /// Every release of the app, oldest first (all pages).
    pub async fn releases(&self, app: &str) -> Result<Vec<Release>, ApiError> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self.list_releases(app, cursor.as_deref()).await?;
            all.extend(page.items);
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// Why each host would or would not get `app`'s next instance (operator only).
    pub async fn explain_placement(
        &self,
        app: &str,
        process: Option<&str>,
        region: Option<&str>,
    ) -> Result<PlacementExplanation, ApiError> {
        let mut path = format!("/v1/hosts/placement?app={app}");
        if let Some(p) = process {
            path.push_str(&format!("&process={p}"));
        }
        if let Some(r) = region {
            path.push_str(&format!("&region={r}"));
        }
        self.get(&path).await
    }

    /// Creates a release of the serving one with a new count or VM size.
    pub async fn scale(
        &self,
        app: &str,
        body: &ScaleRequest,
        idempotency_key: &str,
    ) -> Result<Release, ApiError> {
        self.post(
            &format!("/v1/apps/{app}/scale"),
            body,
            Some(idempotency_key),
        )
        .await
    }

    /// Creates a release restoring version `version` (the previous healthy one when `None`).
    pub async fn rollback(
        &self,
        app: &str,
        version: Option<u64>,
        idempotency_key: &str,
    ) -> Result<Release, ApiError> {
        self.post(
            &format!("/v1/apps/{app}/rollback"),
            &Rollback { version },
            Some(idempotency_key),
        )
        .await
    }

    pub async fn ips(&self, app: &str) -> Result<AppIps, ApiError> {
        self.get(&format!("/v1/apps/{app}/ips")).await
    }

    pub async fn allocate_ipv4(
        &self,
        app: &str,
        idempotency_key: &str,
    ) -> Result<AllocatedIp, ApiError> {
        self.post(
            &format!("/v1/apps/{app}/ips"),
            &AllocateIp { kind: "v4".into() },
            Some(idempotency_key),
        )
        .await
    }

    pub async fn release_ip(&self, app: &str, address: std::net::Ipv4Addr) -> Result<(), ApiError> {
        let path = format!("/v1/apps/{app}/ips/{address}");
        let _: serde_json::Value = self
            .send(&path, self.req(reqwest::Method::DELETE, &path))
            .await?;
        Ok(())
    }

    /// Destroys an app (`confirm` must be its name).
    pub async fn destroy_app(&self, app: &str, confirm: &str) -> Result<(), ApiError> {
        let path = format!("/v1/apps/{app}");
        let resp = self
            .req(reqwest::Method::DELETE, &path)
            .query(&[("confirm", confirm)])
            .send()
            .await
            .map_err(|source| ApiError::Connect {
                url: self.base.clone(),
                source,
            })?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(problem_of(resp).await)
    }

    pub async fn status(&self, app: &str) -> Result<AppStatus, ApiError> {
        self.get(&format!("/v1/apps/{app}/status")).await
    }

    pub async fn register_host(&self, body: &RegisterHost) -> Result<HostRegistration, ApiError> {
        self.post("/v1/hosts", body, None).await
    }

    /// Long-polls the host's assignments newer than `after`.
    pub async fn assignments(
        &self,
        host: &HostId,
        after: u64,
        wait: Duration,
    ) -> Result<Assignments, ApiError> {
        let path = format!(
            "/v1/hosts/{host}/assignments?after={after}&wait_ms={}",
            wait.as_millis()
        );
        self.send(
            &path,
            self.req(reqwest::Method::GET, &path)
                .timeout(wait + Duration::from_secs(10)),
        )
        .await
    }

    pub async fn report_instance(
        &self,
        host: &HostId,
        instance: &InstanceId,
        report: &InstanceReport,
    ) -> Result<(), ApiError> {
        let path = format!("/v1/hosts/{host}/instances/{instance}/report");
        let _: serde_json::Value = self.post(&path, report, None).await?;
        Ok(())
    }

    /// Sends a batch of instance log lines (agents).
    pub async fn ship_logs(&self, host: &HostId, lines: &[LogRecord]) -> Result<(), ApiError> {
        let path = format!("/v1/hosts/{host}/logs");
        let _: serde_json::Value = self.post(&path, &lines, None).await?;
        Ok(())
    }

    /// Opens an app's log: past lines first, then (with `follow`) new ones as they come.
    pub async fn logs(&self, app: &str, query: &LogsQuery) -> Result<LogStream, ApiError> {
        let path = format!("/v1/apps/{app}/logs");
        let resp = self
            .req(reqwest::Method::GET, &path)
            .query(query)
            .send()
            .await
            .map_err(|source| ApiError::Connect {
                url: self.base.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            return Err(problem_of(resp).await);
        }
        Ok(LogStream {
            resp,
            buf: Vec::new(),
            path,
        })
    }

    /// Long-polls the exec sessions the control plane wants this host to serve (agents).
    pub async fn exec_requests(
        &self,
        host: &HostId,
        wait: Duration,
    ) -> Result<Vec<ExecRequest>, ApiError> {
        let path = format!(
            "/v1/hosts/{host}/exec-requests?wait_ms={}",
            wait.as_millis()
        );
        self.send(
            &path,
            self.req(reqwest::Method::GET, &path)
                .timeout(wait + Duration::from_secs(10)),
        )
        .await
    }

    /// Opens a WebSocket to `path` (with the query string) with this client's token. Its binary
    /// messages carry guest-channel frames (`kiln_types::frame`).
    pub async fn websocket(&self, path_and_query: &str) -> Result<WebSocket, ApiError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}{}", self.base.replacen("http", "ws", 1), path_and_query);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|_| ApiError::BadUrl { url: url.clone() })?;
        let auth = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| ApiError::BadUrl { url: url.clone() })?;
        request.headers_mut().insert("authorization", auth);
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp.body().clone().unwrap_or_default();
                let problem =
                    serde_json::from_slice::<Problem>(&body).unwrap_or_else(|_| Problem {
                        type_: "about:blank".into(),
                        title: "error".into(),
                        status,
                        code: "http_error".into(),
                        detail: Some(String::from_utf8_lossy(&body).chars().take(500).collect()),
                        errors: None,
                        request_id: None,
                    });
                Err(ApiError::Api {
                    status,
                    problem: Box::new(problem),
                })
            }
            Err(source) => Err(ApiError::WebSocket {
                url,
                source: Box::new(source),
            }),
        }
    }

    /// Long-polls the route table newer than `after`.
    pub async fn routes(&self, after: u64, wait: Duration) -> Result<RouteTable, ApiError> {
        let path = format!("/v1/routes?after={after}&wait_ms={}", wait.as_millis());
        self.send(
            &path,
            self.req(reqwest::Method::GET, &path)
                .timeout(wait + Duration::from_secs(10)),
        )
        .await
    }
}

/// `path` with `?cursor=` when there is one (cursors are hex and dots: nothing to escape).
fn page_path(path: &str, cursor: Option<&str>) -> String {
    match cursor {
        Some(c) => format!("{path}?cursor={c}"),
        None => path.to_owned(),
    }
}

/// Reads an error response into [`ApiError::Api`].
// ---- Auth: tokens and device login. ----
impl Client {
    pub async fn create_token(&self, body: &CreateToken) -> Result<CreatedToken, ApiError> {
        self.post("/v1/tokens", body, None).await
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ApiError> {
        self.get("/v1/tokens").await
    }

    /// Revokes a token (the caller's own, one of its user's, or any of the org with admin).
    pub async fn revoke_token(&self, id: &kiln_types::TokenId) -> Result<TokenInfo, ApiError> {
        let path = format!("/v1/tokens/{id}");
        self.send(&path, self.req(reqwest::Method::DELETE, &path))
            .await
    }

    /// Starts a device login (needs no token).
    pub async fn device_code(
        &self,
        body: &DeviceCodeRequest,
    ) -> Result<DeviceAuthorization, ApiError> {
        let path = "/v1/device/code";
        self.send(
            path,
            self.http.post(format!("{}{}", self.base, path)).form(body),
        )
        .await
    }

    /// Polls for the token of a device login: `Ok(Err(e))` is an OAuth error answer
    /// (`authorization_pending`, `slow_down`, ...), `Err` anything else.
    pub async fn device_token(
        &self,
        body: &DeviceTokenRequest,
    ) -> Result<Result<DeviceAccessToken, OAuthError>, ApiError> {
        let path = "/v1/device/token";
        let resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .form(body)
            .send()
            .await
            .map_err(|source| ApiError::Connect {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return resp
                .json()
                .await
                .map(Ok)
                .map_err(|source| ApiError::Decode {
                    path: path.to_owned(),
                    source,
                });
        }
        if status == reqwest::StatusCode::BAD_REQUEST {
            let text = resp.text().await.unwrap_or_default();
            return match serde_json::from_str::<OAuthError>(&text) {
                Ok(e) => Ok(Err(e)),
                Err(_) => Ok(Err(OAuthError {
                    error: "invalid_request".into(),
                    error_description: Some(text.chars().take(200).collect()),
                    interval: None,
                })),
            };
        }
        Err(problem_of(resp).await)
    }
}

async fn problem_of(resp: reqwest::Response) -> ApiError {
    let status = resp.status();
    let request_id = resp
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.text().await.unwrap_or_default();
    let mut problem = serde_json::from_str::<Problem>(&text).unwrap_or_else(|_| Problem {
        type_: "about:blank".into(),
        title: status.canonical_reason().unwrap_or("error").into(),
        status: status.as_u16(),
        code: "http_error".into(),
        detail: Some(text.chars().take(500).collect()),
        errors: None,
        request_id: None,
    });
    if problem.request_id.is_none() {
        problem.request_id = request_id;
    }
    ApiError::Api {
        status: status.as_u16(),
        problem: Box::new(problem),
    }
}
