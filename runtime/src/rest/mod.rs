//! The REST API of a running job (feature `rest`), after Flink's: status,
//! checkpoint history and statistics, triggers for a checkpoint, a
//! savepoint, stop-with-savepoint and cancel, the job's metrics for
//! Prometheus ([`prometheus`]), and a dashboard at `/` ([`dashboard`]).
//! Plus [`RestClient`], what the CLI's `status` / `checkpoint` /
//! `savepoint` / `cancel` commands use.
//!
//! **Access.** Anyone who can reach the port can stop or cancel the job.
//! [`serve`] therefore binds another address than loopback only with a
//! token, and with a token every request must carry it, the dashboard and
//! the actions included: `Authorization: Bearer TOKEN`, or `?token=TOKEN`
//! in the URL (what a browser opening the dashboard and Prometheus'
//! `params` can send; use letters, digits, `-`, `_` and `.`). There is no
//! TLS: beyond a trusted network, put a TLS-terminating proxy in front.
//!
//! Against web pages in the operator's browser (cross-site requests, DNS
//! rebinding), every request is also refused when it carries an `Origin`
//! other than the API's own, when it names another host than a loopback
//! one while the API has no token, and — for `POST` — when its body is
//! not declared `application/json` (send `{}` for the actions without
//! arguments).
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /` | | the dashboard (HTML) |
//! | `GET /metrics` | | the metrics, OpenMetrics text ([`prometheus`]) |
//! | `GET /job` | | [`JobStatus`](crate::JobStatus) |
//! | `GET /tasks` | | every task's counters and rates ([`crate::metrics::Sample`]) |
//! | `GET /timeline` | | job throughput and backpressure, one point a second, the last 10 minutes |
//! | `GET /checkpoints[?limit=N]` | | counts, latest completed, history (oldest first; the newest N) with per-task detail |
//! | `POST /checkpoints` | | `{"id": n}` once checkpoint `n` completed |
//! | `POST /savepoints` | `{"target": "s3://b/p", "stop": false}` | `{"id": n, "location": "…"}` once complete |
//! | `POST /stop` | `{"target": "…"}` | as `/savepoints` with `"stop": true`; the job then ends |
//! | `POST /cancel` | | `{"cancelled": true}` |
//!
//! Errors answer `{"error": "…"}` with 400 (bad request or target), 401
//! (token missing or wrong), 409 (the job cannot take it now) or 500 (the
//! checkpoint or savepoint failed). Triggers answer when the checkpoint or
//! savepoint is complete (they can take as long as the checkpoint timeout).

pub mod dashboard;
pub mod prometheus;

use crate::error::RuntimeError;
use crate::handle::{CheckpointStats, CheckpointStatus, JobMonitor, JobState};
use crate::metrics::RateSampler;
use crate::savepoint::SavepointLocation;
use axum::extract::{RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Turns a savepoint target string of a request into a location (the CLI's
/// is [`crate::location::open_location`]).
pub type TargetResolver =
    Arc<dyn Fn(String) -> BoxFuture<'static, crate::Result<SavepointLocation>> + Send + Sync>;

struct Api {
    monitor: JobMonitor,
    resolve: TargetResolver,
    sampler: RateSampler,
    token: Option<String>,
}

/// How many one-second samples `GET /timeline` keeps.
const TIMELINE_SAMPLES: usize = 600;

type Reply = (StatusCode, Json<Value>);

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    (status, Json(json!({ "error": message.into() })))
}

/// Serves the API of the job `monitor` watches on `addr` (port 0: any free
/// port) until the returned task is aborted. Returns the bound address.
///
/// With `token`, every request must carry it (see the module's docs);
/// without one, `addr` must be a loopback address (an `InvalidInput` error
/// says so otherwise).
pub async fn serve(
    addr: SocketAddr,
    monitor: JobMonitor,
    resolve: TargetResolver,
    token: Option<String>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_until(addr, monitor, resolve, token, std::future::pending()).await
}

/// [`serve`] until `shutdown` completes, then gracefully: the returned
/// task ends once the requests in flight are answered (a stop-with-savepoint
/// request gets its answer although the job ended with it).
pub async fn serve_until(
    addr: SocketAddr,
    monitor: JobMonitor,
    resolve: TargetResolver,
    token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    match token.as_deref() {
        Some(t) if t.is_empty() || !t.bytes().all(token_byte) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the REST token must be non-empty and made of letters, digits, '-', '_' and '.'",
            ))
        }
        None if !addr.ip().is_loopback() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the REST API would listen on {addr}, reachable from other machines, without a token: \
                     give one (--rest-token or SLUICE_REST_TOKEN) or bind to 127.0.0.1"
                ),
            ))
        }
        _ => {}
    }
    let sampler = RateSampler::new(monitor.metrics(), TIMELINE_SAMPLES);
    let api = Arc::new(Api {
        monitor,
        resolve,
        sampler,
        token,
    });
    let app = Router::new()
        .route("/", get(dashboard::page))
        .route("/metrics", get(metrics))
        .route("/job", get(job))
        .route("/tasks", get(tasks))
        .route("/timeline", get(timeline))
        .route("/checkpoints", get(checkpoints).post(trigger_checkpoint))
        .route("/savepoints", post(savepoint))
        .route("/stop", post(stop))
        .route("/cancel", post(cancel))
        .layer(middleware::from_fn_with_state(api.clone(), authorize))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let sample = async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                api.sampler.sample();
            }
        };
        tokio::select! {
            r = axum::serve(listener, app).with_graceful_shutdown(shutdown) => if let Err(e) = r {
                tracing::warn!("REST API on {local} stopped: {e}");
            },
            _ = sample => {}
        }
    });
    Ok((local, task))
}

fn token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// Equal, in a time that depends on the longer input only (the caller's
/// guess, not the token).
fn same(guess: &[u8], token: &[u8]) -> bool {
    let n = guess.len().max(token.len());
    let diff = (0..n).fold(guess.len() ^ token.len(), |acc, i| {
        acc | usize::from(guess.get(i).copied().unwrap_or(0) ^ token.get(i).copied().unwrap_or(0))
    });
    diff == 0
}

/// The host part of a `Host` header or an `Origin` URL's authority.
fn host_of(authority: &str) -> &str {
    let a = authority.rsplit('@').next().unwrap_or(authority);
    match a.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => a.split(':').next().unwrap_or(a),
    }
}

/// Refuses what a web page in the operator's browser could send or read
/// (cross-site requests, DNS rebinding), with or without a token: a
/// request naming another host than a loopback one when the API has no
/// token, an `Origin` other than the API's own, and a `POST` whose body is
/// not declared JSON (which a page cannot send cross-site without the
/// browser asking first, and this API never agrees).
fn refuse_cross_site(api: &Api, req: &Request) -> Option<Response> {
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if api.token.is_none() {
        let loopback = host.map(host_of).is_none_or(|h| {
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        });
        if !loopback {
            return Some(
                error(
                    StatusCode::FORBIDDEN,
                    "this REST API answers only requests to a loopback address (it has no token)",
                )
                .into_response(),
            );
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let own = origin
            .split_once("://")
            .map(|(_, authority)| authority.trim_end_matches('/'));
        if own.is_none() || own != host {
            return Some(
                error(
                    StatusCode::FORBIDDEN,
                    format!("a request from the web page at {origin} is refused"),
                )
                .into_response(),
            );
        }
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if req.method() == axum::http::Method::POST && !json {
        return Some(
            error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send actions with `Content-Type: application/json` (a body of `{}` will do)",
            )
            .into_response(),
        );
    }
    None
}

/// Refuses cross-site requests ([`refuse_cross_site`]); with a token
/// configured, refuses every request that does not carry it.
async fn authorize(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    if let Some(token) = &api.token {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        let query = query_param(req.uri().query(), "token");
        if !bearer
            .or(query)
            .is_some_and(|t| same(t.as_bytes(), token.as_bytes()))
        {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "this job's REST API needs its token: send `Authorization: Bearer TOKEN` or add `?token=TOKEN`",
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    if let Some(refused) = refuse_cross_site(&api, &req) {
        return refused;
    }
    next.run(req).await
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    let body = prometheus::render(&api.monitor, api.sampler.latest().as_ref());
    ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], body).into_response()
}

async fn tasks(State(api): State<Arc<Api>>) -> Reply {
    let sample = api.sampler.latest().unwrap_or_else(|| api.sampler.sample());
    match serde_json::to_value(sample) {
        Ok(v) => (StatusCode::OK, Json(v)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn timeline(State(api): State<Arc<Api>>) -> Reply {
    let points: Vec<Value> = api
        .sampler
        .history()
        .iter()
        .map(|s| {
            json!({
                "time_ms": s.time_ms,
                "source_records_per_second": s.source_records_per_second,
                "backpressured_ms_per_second_max": s
                    .tasks
                    .iter()
                    .map(|t| t.backpressured_ms_per_second)
                    .fold(0.0, f64::max),
            })
        })
        .collect();
    (StatusCode::OK, Json(Value::Array(points)))
}

async fn job(State(api): State<Arc<Api>>) -> Reply {
    match serde_json::to_value(api.monitor.status()) {
        Ok(v) => (StatusCode::OK, Json(v)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn stats_json(s: &CheckpointStats) -> Value {
    let (status, failure) = match &s.status {
        CheckpointStatus::InProgress => ("IN_PROGRESS", None),
        CheckpointStatus::Completed => ("COMPLETED", None),
        CheckpointStatus::Failed(r) => ("FAILED", Some(r.clone())),
        CheckpointStatus::Unresolved(r) => ("UNRESOLVED", Some(r.clone())),
    };
    json!({
        "id": s.id.0,
        "kind": s.kind.to_string(),
        "status": status,
        "failure": failure,
        "trigger_time_ms": s.trigger_time_ms,
        "duration_ms": s.duration.as_millis() as u64,
        "state_size": s.state_size,
        "written_size": s.written_size,
        "alignment_max_ms": s.alignment_max().as_millis() as u64,
        "sync_max_ms": s.sync_max.as_millis() as u64,
        "async_max_ms": s.async_max.as_millis() as u64,
        "channel_state_size": s.channel_state_size,
        "operators": s.operators.iter().map(|(uid, size)| json!({"uid": uid, "state_size": size})).collect::<Vec<_>>(),
        "subtasks": s.subtasks.iter().map(|t| json!({
            "task": t.task,
            "acknowledged_after_ms": t.acknowledged_after.as_secs_f64() * 1e3,
            "start_delay_ms": t.start_delay.as_secs_f64() * 1e3,
            "alignment_ms": t.alignment.as_secs_f64() * 1e3,
            "sync_ms": t.sync.as_secs_f64() * 1e3,
            "async_ms": t.async_part.as_secs_f64() * 1e3,
            "state_size": t.state_size,
        })).collect::<Vec<_>>(),
    })
}

/// The (first) value of parameter `name` in a query string.
fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

/// `limit=N` of a query string, if given.
fn limit_of(query: Option<&str>) -> std::result::Result<Option<usize>, String> {
    let Some(v) = query_param(query, "limit") else {
        return Ok(None);
    };
    v.parse()
        .map(Some)
        .map_err(|_| format!("limit={v:?}: give a number of checkpoints, e.g. limit=100"))
}

async fn checkpoints(State(api): State<Arc<Api>>, RawQuery(query): RawQuery) -> Reply {
    let limit = match limit_of(query.as_deref()) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let (_, completed, failed) = api.monitor.metrics().checkpoint_counts();
    // Read in place: the log holds up to 10 000 entries with per-task
    // detail; only the history asked for is copied out.
    let body = api.monitor.with_checkpoint_stats(|stats| {
        let done = || stats.iter().filter(|s| s.status == CheckpointStatus::Completed);
        let mut durations: Vec<u64> = done().map(|s| s.duration.as_millis() as u64).collect();
        durations.sort_unstable();
        let pct =
            |p: usize| durations.get((durations.len() * p / 100).min(durations.len().saturating_sub(1)));
        let latest = done().next_back();
        let shown = &stats[stats.len().saturating_sub(limit.unwrap_or(stats.len()))..];
        json!({
            "counts": {
                "completed": completed,
                "failed": failed,
                "in_progress": stats.iter().filter(|s| s.status == CheckpointStatus::InProgress).count(),
            },
            "summary": {
                "duration_p50_ms": pct(50),
                "duration_p99_ms": pct(99),
                "duration_max_ms": durations.last(),
                "state_size_last": latest.map(|s| s.state_size),
            },
            "latest_completed": latest.map(stats_json),
            "history": shown.iter().map(stats_json).collect::<Vec<_>>(),
        })
    });
    (StatusCode::OK, Json(body))
}

fn not_running(api: &Api) -> Option<Reply> {
    let state = api.monitor.status().state;
    (state != JobState::Running && state != JobState::Restarting).then(|| {
        error(
            StatusCode::CONFLICT,
            format!("the job is {}", format!("{state:?}").to_lowercase()),
        )
    })
}

async fn trigger_checkpoint(State(api): State<Arc<Api>>) -> Reply {
    if let Some(r) = not_running(&api) {
        return r;
    }
    match api.monitor.trigger_checkpoint().await {
        Ok(id) => (StatusCode::OK, Json(json!({ "id": id.0 }))),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The body of `POST /savepoints` and `POST /stop`.
#[derive(Debug, Deserialize)]
struct SavepointRequest {
    target: String,
    #[serde(default)]
    stop: bool,
}

async fn take_savepoint(api: &Api, target: String, stop: bool) -> Reply {
    if let Some(r) = not_running(api) {
        return r;
    }
    let location = match (api.resolve)(target.clone()).await {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("target {target:?}: {e}")),
    };
    let result = if stop {
        api.monitor.stop_with_savepoint(location).await
    } else {
        api.monitor.trigger_savepoint(location).await
    };
    match result {
        Ok(sp) => (
            StatusCode::OK,
            Json(json!({ "id": sp.id.0, "location": sp.path(), "stopped": stop })),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn savepoint(State(api): State<Arc<Api>>, body: Option<Json<SavepointRequest>>) -> Reply {
    match body {
        Some(Json(r)) => take_savepoint(&api, r.target, r.stop).await,
        None => error(
            StatusCode::BAD_REQUEST,
            "send a JSON body {\"target\": \"redb:PATH#DIR or s3://bucket/prefix\", \"stop\": false}",
        ),
    }
}

async fn stop(State(api): State<Arc<Api>>, body: Option<Json<SavepointRequest>>) -> Reply {
    match body {
        Some(Json(r)) => take_savepoint(&api, r.target, true).await,
        None => error(
            StatusCode::BAD_REQUEST,
            "send a JSON body {\"target\": \"redb:PATH#DIR or s3://bucket/prefix\"}",
        ),
    }
}

async fn cancel(State(api): State<Arc<Api>>) -> Reply {
    if let Some(r) = not_running(&api) {
        return r;
    }
    api.monitor.cancel();
    (StatusCode::OK, Json(json!({ "cancelled": true })))
}

/// A blocking client of the API, for the CLI.
pub struct RestClient {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl RestClient {
    /// A client of the job at `base` (`http://127.0.0.1:8081`). Requests
    /// time out after `timeout` (a savepoint can take as long as the
    /// checkpoint timeout).
    pub fn new(base: &str, timeout: Duration) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        RestClient {
            base: base.trim_end_matches('/').to_string(),
            agent,
            token: None,
        }
    }

    /// Sends `token` with every request (`Authorization: Bearer`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    fn answer(
        &self,
        path: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> crate::Result<Value> {
        let url = format!("{}{path}", self.base);
        let fail = |reason: String| RuntimeError::Rest {
            url: url.clone(),
            reason,
        };
        let mut resp = r.map_err(|e| fail(format!("cannot reach the job: {e}")))?;
        let status = resp.status();
        let body: Value = resp
            .body_mut()
            .read_json()
            .map_err(|e| fail(format!("answered HTTP {status} without JSON: {e}")))?;
        if status.is_success() {
            Ok(body)
        } else {
            let msg = body["error"].as_str().unwrap_or("no message").to_string();
            Err(fail(format!("HTTP {status}: {msg}")))
        }
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> crate::Result<Value> {
        let mut req = self.agent.get(&format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let r = req.call();
        self.answer(path, r)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: Value) -> crate::Result<Value> {
        let mut req = self.agent.post(&format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let r = req.send_json(&body);
        self.answer(path, r)
    }
}
