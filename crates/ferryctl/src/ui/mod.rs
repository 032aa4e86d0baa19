//! `ferryctl ui`: the web console. A small HTTP server on a loopback address that serves
//! one page (embedded in the binary, no external assets) and a JSON API over the agents'
//! gRPC, called with the operator's own certificate. The agents get no new listener: the
//! console is one more gRPC client, and the browser never sees a credential.
//!
//! Access: the session token printed at start (`/?token=…` once, then an HttpOnly,
//! SameSite=Strict cookie) is required on every request; requests naming another host
//! (DNS rebinding) are refused; state-changing calls take JSON bodies only, which a
//! cross-site form cannot send.

use crate::connect::{connect, rpc_error};
use crate::json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_client::FerryControlClient;
use ferry_transport::pki::Identity;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// The page: HTML, CSS and script in one file, compiled into the binary.
const PAGE: &str = include_str!("page.html");

/// The session cookie's name, followed by the console's port: browsers send a
/// 127.0.0.1 cookie to every port of the host, so two consoles (or another local server)
/// must not see or clobber each other's token.
const COOKIE_PREFIX: &str = "ferry_ui_";

/// How long a plain agent call may take before the page is told so.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// A preflight probes the link and samples the guest: longer.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(90);
/// ResolveMigration: the agent's probe of the target (5 s) and its wait for the end (60 s).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(75);

type Client = FerryControlClient<Channel>;

/// What the console serves and with which identity.
pub struct Console {
    /// Agent name -> gRPC address, in name order.
    hosts: BTreeMap<String, String>,
    identity: Identity,
    token: String,
    /// `ferry_ui_<port>`.
    cookie: String,
    clients: Mutex<HashMap<String, Client>>,
}

impl Console {
    /// A console over `hosts` (name -> address) calling with `identity`, served on
    /// `port`; `token` is the session token a browser must present.
    pub fn new(
        hosts: BTreeMap<String, String>,
        identity: Identity,
        token: String,
        port: u16,
    ) -> Console {
        Console {
            hosts,
            identity,
            token,
            cookie: format!("{COOKIE_PREFIX}{port}"),
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn addr(&self, host: &str) -> Result<&str, ApiError> {
        self.hosts
            .get(host)
            .map(String::as_str)
            .ok_or_else(|| ApiError::UnknownHost(host.to_string()))
    }

    /// A gRPC client for `host`, reusing its channel.
    async fn client(&self, host: &str) -> Result<Client, ApiError> {
        let addr = self.addr(host)?.to_string();
        if let Some(c) = self.clients.lock().await.get(host) {
            return Ok(c.clone());
        }
        let c = connect(&addr, &self.identity)
            .await
            .map_err(|e| ApiError::agent(host, StatusCode::BAD_GATEWAY, format!("{e:#}")))?;
        self.clients
            .lock()
            .await
            .insert(host.to_string(), c.clone());
        Ok(c)
    }

    /// Forgets a channel that failed at the transport level: the next call reconnects.
    async fn forget(&self, host: &str) {
        self.clients.lock().await.remove(host);
    }

    /// Runs one agent call with a deadline; errors keep the agent's own message.
    async fn call<T, F, Fut>(
        &self,
        host: &str,
        what: &str,
        limit: Duration,
        f: F,
    ) -> Result<T, ApiError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let c = self.client(host).await?;
        match tokio::time::timeout(limit, f(c)).await {
            Err(_) => Err(ApiError::agent(
                host,
                StatusCode::GATEWAY_TIMEOUT,
                format!("{what}: no answer from agent {host} within {limit:?}"),
            )),
            Ok(Err(status)) => {
                if matches!(status.code(), tonic::Code::Unavailable) {
                    self.forget(host).await;
                }
                Err(ApiError::agent(
                    host,
                    http_status(status.code()),
                    rpc_error(what, status).to_string(),
                ))
            }
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    fn token_ok(&self, presented: &str) -> bool {
        constant_time_eq(presented.as_bytes(), self.token.as_bytes())
    }

    /// Whether a request carries this session's token: in any cookie of this console's
    /// name, or in `X-Ferry-Token`.
    fn presented_ok(&self, headers: &HeaderMap) -> bool {
        cookie_values(headers, &self.cookie).any(|t| self.token_ok(t))
            || headers
                .get("x-ferry-token")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| self.token_ok(t))
    }
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// gRPC codes as HTTP statuses for the page.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | FailedPrecondition | Aborted => StatusCode::CONFLICT,
        PermissionDenied | Unauthenticated => StatusCode::FORBIDDEN,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unavailable => StatusCode::BAD_GATEWAY,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An API error as the page shows it: `{"error": "...", "host": "..."}`.
#[derive(Debug)]
pub enum ApiError {
    /// The request itself is wrong (missing field, same source and target…).
    BadRequest(String),
    /// A host name the console was not given.
    UnknownHost(String),
    /// The agent refused or failed; its message as it is.
    Agent {
        /// The host whose agent answered (or did not).
        host: String,
        /// The HTTP status its gRPC code maps to.
        status: StatusCode,
        /// What the agent said, naming host, VM and step.
        message: String,
    },
}

impl ApiError {
    fn agent(host: &str, status: StatusCode, message: String) -> ApiError {
        ApiError::Agent {
            host: host.to_string(),
            status,
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({ "error": m })),
            ApiError::UnknownHost(h) => (
                StatusCode::NOT_FOUND,
                json!({ "error": format!("unknown host {h:?}: not one this console was given"), "host": h }),
            ),
            ApiError::Agent {
                host,
                status,
                message,
            } => (status, json!({ "error": message, "host": host })),
        };
        (status, Json(body)).into_response()
    }
}

/// A request body that is not the JSON expected (or not JSON at all: a cross-site form
/// cannot send `application/json`), as the page's error shape.
fn bad_json(r: JsonRejection) -> ApiError {
    ApiError::BadRequest(r.body_text())
}

/// The router: the page, the API, and the guard in front of both.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/hosts", get(hosts))
        .route("/api/vm", post(vm_action))
        .route("/api/preflight", post(preflight))
        .route("/api/migrate", post(migrate))
        .route("/api/cancel", post(cancel))
        .route("/api/resolve", post(resolve))
        .route("/api/migrations", get(migrations))
        .route("/api/watch", get(watch))
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

/// Serves until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, console: Arc<Console>) -> anyhow::Result<()> {
    axum::serve(listener, router(console))
        .await
        .map_err(|e| anyhow::anyhow!("web console: {e}"))
}

/// Whether a `Host` header names a loopback address or `localhost` (not a name that
/// could be rebound to this listener).
fn host_is_local(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((n, port)) if !n.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => n,
        _ => host,
    };
    crate::connect::is_loopback_host(name)
}

/// Values of every cookie called `name`.
fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Every request: a local `Host`, and the session token (cookie, or `X-Ferry-Token`).
/// `/?token=…` with the right token sets the cookie and drops the token from the address.
async fn guard(
    State(c): State<Arc<Console>>,
    Query(q): Query<TokenQuery>,
    req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    if !host_is_local(headers) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "ferryctl ui answers only to 127.0.0.1, localhost or [::1]",
        )
            .into_response();
    }
    if req.uri().path() == "/" {
        if let Some(t) = q.token.as_deref() {
            if c.token_ok(t) {
                let mut r = Redirect::to("/").into_response();
                let cookie = format!("{}={t}; HttpOnly; SameSite=Strict; Path=/", c.cookie);
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
                return r;
            }
        }
    }
    if !c.presented_ok(headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({
                "error": "no valid session token: open the address `ferryctl ui` printed (it carries the token)"
            })),
        )
            .into_response();
    }
    next.run(req).await
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        Html(PAGE),
    )
}

/// Every host with its facts and VMs; an unreachable agent is listed with its error.
async fn hosts(State(c): State<Arc<Console>>) -> Json<Value> {
    let mut set = tokio::task::JoinSet::new();
    for (i, (name, addr)) in c.hosts.iter().enumerate() {
        let (c, name, addr) = (c.clone(), name.clone(), addr.clone());
        set.spawn(async move {
            let facts = c
                .call(&name, &format!("host facts of {name}"), CALL_TIMEOUT, |mut cl| async move {
                    cl.get_host_facts(pb::HostFactsRequest {}).await
                })
                .await;
            let vms = c
                .call(&name, &format!("list VMs on {name}"), CALL_TIMEOUT, |mut cl| async move {
                    cl.list_vms(pb::ListVmsRequest {}).await
                })
                .await;
            let err = |e: &ApiError| match e {
                ApiError::Agent { message, .. } => message.clone(),
                other => format!("{other:?}"),
            };
            let v = json!({
                "name": name,
                "addr": addr,
                "facts": facts.as_ref().ok().map(json::host_facts),
                "facts_error": facts.as_ref().err().map(err),
                "vms": vms.as_ref().ok().map(|r| r.vms.iter().map(json::vm_info).collect::<Vec<_>>()),
                "error": vms.as_ref().err().map(err),
            });
            (i, v)
        });
    }
    let mut out: Vec<(usize, Value)> = set.join_all().await;
    out.sort_by_key(|(i, _)| *i);
    Json(json!({ "hosts": out.into_iter().map(|(_, v)| v).collect::<Vec<_>>() }))
}

#[derive(Deserialize)]
struct VmAction {
    host: String,
    vm: String,
    action: String,
}

async fn vm_action(
    State(c): State<Arc<Console>>,
    body: Result<Json<VmAction>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(a) = body.map_err(bad_json)?;
    let r = |name: &str| pb::VmRef {
        name: name.to_string(),
    };
    let what = format!("{} VM {} on {}", a.action, a.vm, a.host);
    let vm = a.vm.clone();
    let info = match a.action.as_str() {
        "start" => {
            c.call(&a.host, &what, CALL_TIMEOUT, |mut cl| async move {
                cl.start_vm(r(&vm)).await
            })
            .await?
        }
        "stop" | "force-stop" => {
            let force = a.action == "force-stop";
            c.call(
                &a.host,
                &what,
                Duration::from_secs(90),
                |mut cl| async move { cl.stop_vm(pb::StopVmRequest { name: vm, force }).await },
            )
            .await?
        }
        "suspend" => {
            c.call(&a.host, &what, CALL_TIMEOUT, |mut cl| async move {
                cl.suspend_vm(r(&vm)).await
            })
            .await?
        }
        "resume" => {
            c.call(&a.host, &what, CALL_TIMEOUT, |mut cl| async move {
                cl.resume_vm(r(&vm)).await
            })
            .await?
        }
        other => {
            return Err(ApiError::BadRequest(format!(
                "unknown action {other:?} (start, stop, force-stop, suspend, resume)"
            )))
        }
    };
    Ok(Json(json!({ "host": a.host, "vm": json::vm_info(&info) })))
}

/// The migration form, as the page sends it.
#[derive(Debug, Deserialize)]
pub struct MigrateForm {
    /// Source host (a name this console was given).
    pub host: String,
    /// VM on it.
    pub vm: String,
    /// Target host (a name).
    pub to: String,
    /// auto, none, lz4, zstd, zstd:N (empty: the agent's default).
    #[serde(default)]
    pub compress: String,
    /// Downtime target, ms (0: the agent's default).
    #[serde(default)]
    pub downtime_ms: u32,
    /// Cap on the data plane, MB/s (0: none).
    #[serde(default)]
    pub bandwidth_mbps: f64,
    /// auto, shared or copy.
    #[serde(default)]
    pub storage: String,
    /// sent, full or none.
    #[serde(default)]
    pub verify: String,
    /// Cold migration of a stopped VM.
    #[serde(default)]
    pub offline: bool,
    /// Offline: start it on the target afterwards.
    #[serde(default)]
    pub start_on_target: bool,
    /// Offline: remove its definition from the source afterwards.
    #[serde(default)]
    pub undefine_source: bool,
    /// Past failed soft checks.
    #[serde(default)]
    pub force: bool,
}

impl MigrateForm {
    /// Checks the form against the hosts given; the agent checks the rest.
    fn check(&self, c: &Console) -> Result<String, ApiError> {
        if self.vm.trim().is_empty() {
            return Err(ApiError::BadRequest("no VM given".into()));
        }
        c.addr(&self.host)?;
        let target = c.addr(&self.to)?.to_string();
        if self.host == self.to {
            return Err(ApiError::BadRequest(format!(
                "VM {} already runs on {}: pick another target",
                self.vm, self.to
            )));
        }
        if !self.bandwidth_mbps.is_finite() || self.bandwidth_mbps < 0.0 {
            return Err(ApiError::BadRequest(
                "bandwidth must be 0 (none) or more".into(),
            ));
        }
        Ok(target)
    }

    fn bandwidth(&self) -> u64 {
        (self.bandwidth_mbps * 1e6) as u64
    }
}

async fn preflight(
    State(c): State<Arc<Console>>,
    body: Result<Json<MigrateForm>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(f) = body.map_err(bad_json)?;
    let target = f.check(&c)?;
    let req = pb::PreflightRequest {
        vm: f.vm.clone(),
        target,
        compress: f.compress.clone(),
        downtime_ms: f.downtime_ms,
        bandwidth_bytes_per_sec: f.bandwidth(),
    };
    let what = format!("preflight of VM {} from {} to {}", f.vm, f.host, f.to);
    let r = c
        .call(&f.host, &what, PREFLIGHT_TIMEOUT, |mut cl| async move {
            cl.preflight(req).await
        })
        .await?;
    Ok(Json(json::preflight_report(&r)))
}

async fn migrate(
    State(c): State<Arc<Console>>,
    body: Result<Json<MigrateForm>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(f) = body.map_err(bad_json)?;
    let target = f.check(&c)?;
    let req = pb::StartMigrationRequest {
        vm: f.vm.clone(),
        target,
        compress: f.compress.clone(),
        downtime_ms: f.downtime_ms,
        bandwidth_bytes_per_sec: f.bandwidth(),
        storage: f.storage.clone(),
        verify: f.verify.clone(),
        offline: f.offline,
        start_on_target: f.offline && f.start_on_target,
        undefine_source: f.offline && f.undefine_source,
        force: f.force,
        ..Default::default()
    };
    let what = format!("migrate VM {} from {} to {}", f.vm, f.host, f.to);
    let s = c
        .call(&f.host, &what, PREFLIGHT_TIMEOUT, |mut cl| async move {
            cl.start_migration(req).await
        })
        .await?;
    Ok(Json(
        json!({ "host": f.host, "status": json::migration_status(&s) }),
    ))
}

#[derive(Deserialize)]
struct MigrationAt {
    host: String,
    id: String,
}

async fn cancel(
    State(c): State<Arc<Console>>,
    body: Result<Json<MigrationAt>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(m) = body.map_err(bad_json)?;
    let id = m.id.clone();
    let s = c
        .call(
            &m.host,
            &format!("cancel migration {}", m.id),
            CALL_TIMEOUT,
            |mut cl| async move { cl.cancel_migration(pb::MigrationRef { id }).await },
        )
        .await?;
    Ok(Json(
        json!({ "host": m.host, "status": json::migration_status(&s) }),
    ))
}

/// The operator's verdict on a migration IN_DOUBT: its target host is gone for good
/// (`ResolveMigration`; the page asks for confirmation first). The agent asks the target
/// once more and answers with the migration's end, within about a minute.
async fn resolve(
    State(c): State<Arc<Console>>,
    body: Result<Json<MigrationAt>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(m) = body.map_err(bad_json)?;
    let id = m.id.clone();
    let s = c
        .call(
            &m.host,
            &format!("resolve migration {} (target gone)", m.id),
            RESOLVE_TIMEOUT,
            |mut cl| async move {
                cl.resolve_migration(pb::ResolveMigrationRequest {
                    id,
                    target_gone: true,
                })
                .await
            },
        )
        .await?;
    Ok(Json(
        json!({ "host": m.host, "status": json::migration_status(&s) }),
    ))
}

/// Every host's migrations (live and from its journal), newest first.
async fn migrations(State(c): State<Arc<Console>>) -> Json<Value> {
    let mut set = tokio::task::JoinSet::new();
    for name in c.hosts.keys() {
        let (c, name) = (c.clone(), name.clone());
        set.spawn(async move {
            let r = c
                .call(
                    &name,
                    &format!("list migrations on {name}"),
                    CALL_TIMEOUT,
                    |mut cl| async move { cl.list_migrations(pb::ListMigrationsRequest {}).await },
                )
                .await;
            (name, r)
        });
    }
    let mut rows: Vec<Value> = Vec::new();
    let mut errors: Vec<Value> = Vec::new();
    for (host, r) in set.join_all().await {
        match r {
            Ok(list) => rows.extend(list.migrations.iter().map(|m| {
                let mut v = json::migration_status(m);
                v["host"] = json!(host);
                v
            })),
            Err(ApiError::Agent { message, .. }) => {
                errors.push(json!({ "host": host, "error": message }))
            }
            Err(e) => errors.push(json!({ "host": host, "error": format!("{e:?}") })),
        }
    }
    rows.sort_by_key(|v| std::cmp::Reverse(v["started_unix_ms"].as_i64().unwrap_or(0)));
    Json(json!({ "migrations": rows, "errors": errors }))
}

/// A migration's status as server-sent events (`status`, then `end`, or `failure` with
/// the agent's error), fed from the agent's `WatchMigration` stream.
async fn watch(
    State(c): State<Arc<Console>>,
    Query(m): Query<MigrationAt>,
) -> Result<Response, ApiError> {
    let mut cl = c.client(&m.host).await?;
    let host = m.host.clone();
    let stream = match tokio::time::timeout(
        CALL_TIMEOUT,
        cl.watch_migration(pb::MigrationRef { id: m.id.clone() }),
    )
    .await
    {
        Err(_) => {
            return Err(ApiError::agent(
                &host,
                StatusCode::GATEWAY_TIMEOUT,
                format!("watch migration {}: no answer from agent {host}", m.id),
            ))
        }
        Ok(Err(s)) => {
            return Err(ApiError::agent(
                &host,
                http_status(s.code()),
                rpc_error(&format!("watch migration {}", m.id), s).to_string(),
            ))
        }
        Ok(Ok(r)) => r.into_inner(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut stream = stream;
        loop {
            // A page that went away ends the agent's stream too, even when no status
            // change is coming (a migration in doubt, an agent that hangs).
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tx.closed() => return,
            };
            let ev = match msg {
                Ok(Some(s)) => {
                    let v = json::migration_status(&s);
                    Event::default().event("status").data(v.to_string())
                }
                Ok(None) => {
                    let _ = tx.send(Ok(Event::default().event("end").data("{}"))).await;
                    return;
                }
                Err(s) => {
                    let msg = rpc_error("watch migration", s).to_string();
                    let v = json!({ "error": msg, "host": host });
                    let _ = tx
                        .send(Ok(Event::default().event("failure").data(v.to_string())))
                        .await;
                    return;
                }
            };
            if tx.send(Ok(ev)).await.is_err() {
                return; // the page went away
            }
        }
    });
    let events = tokio_stream::wrappers::ReceiverStream::<Result<Event, Infallible>>::new(rx);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A new random session token (32 bytes, hex).
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_host_headers_pass() {
        let mut h = HeaderMap::new();
        assert!(!host_is_local(&h), "no Host header");
        for ok in [
            "127.0.0.1:7780",
            "localhost:7780",
            "[::1]:7780",
            "localhost",
            "127.0.0.2:80",
        ] {
            h.insert(header::HOST, HeaderValue::from_static(ok));
            assert!(host_is_local(&h), "{ok}");
        }
        for bad in [
            "evil.example:7780",
            "127.0.0.1.evil.example",
            "10.0.0.1:7780",
        ] {
            h.insert(header::HOST, HeaderValue::from_static(bad));
            assert!(!host_is_local(&h), "{bad}");
        }
    }

    #[test]
    fn session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; ferry_ui_7780=old; ferry_ui_7781=abc; b=2"),
        );
        assert_eq!(
            cookie_values(&h, "ferry_ui_7781").collect::<Vec<_>>(),
            ["abc"]
        );
        assert_eq!(
            cookie_values(&h, "ferry_ui_7780").collect::<Vec<_>>(),
            ["old"]
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token());
    }

    #[test]
    fn grpc_codes_map_to_http() {
        assert_eq!(http_status(tonic::Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(tonic::Code::FailedPrecondition),
            StatusCode::CONFLICT
        );
        assert_eq!(
            http_status(tonic::Code::Unavailable),
            StatusCode::BAD_GATEWAY
        );
    }
}
