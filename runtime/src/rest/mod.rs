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
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /` | | the dashboard (HTML) |
//! | `GET /metrics` | | the metrics, OpenMetrics text ([`prometheus`]) |
//! | `GET /job` | | [`JobStatus`](crate::JobStatus) |
//! | `GET /tasks` | | every task's counters and rates ([`crate::metrics::Sample`]) |
//! | `GET /timeline` | | job throughput and backpressure, one point a second, the last 10 minutes |
//! | `GET /checkpoints` | | counts, latest completed, history (oldest first) with per-task detail |
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
use axum::extract::{Request, State};
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
            r = axum::serve(listener, app) => if let Err(e) = r {
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

/// Equal in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// With a token configured, refuses every request that does not carry it.
async fn authorize(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let Some(token) = &api.token else {
        return next.run(req).await;
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    if bearer
        .or(query)
        .is_some_and(|t| same(t.as_bytes(), token.as_bytes()))
    {
        return next.run(req).await;
    }
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "this job's REST API needs its token: send `Authorization: Bearer TOKEN` or add `?token=TOKEN`",
    )
    .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
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

async fn checkpoints(State(api): State<Arc<Api>>) -> Reply {
    let stats = api.monitor.checkpoint_stats();
    let count = |f: &dyn Fn(&CheckpointStats) -> bool| stats.iter().filter(|s| f(s)).count();
    let completed: Vec<&CheckpointStats> = stats
        .iter()
        .filter(|s| s.status == CheckpointStatus::Completed)
        .collect();
    let mut durations: Vec<u64> = completed.iter().map(|s| s.duration.as_millis() as u64).collect();
    durations.sort_unstable();
    let pct = |p: usize| durations.get((durations.len() * p / 100).min(durations.len().saturating_sub(1)));
    let body = json!({
        "counts": {
            "completed": completed.len(),
            "failed": count(&|s| matches!(s.status, CheckpointStatus::Failed(_))),
            "in_progress": count(&|s| s.status == CheckpointStatus::InProgress),
        },
        "summary": {
            "duration_p50_ms": pct(50),
            "duration_p99_ms": pct(99),
            "duration_max_ms": durations.last(),
            "state_size_last": completed.last().map(|s| s.state_size),
        },
        "latest_completed": completed.last().map(|s| stats_json(s)),
        "history": stats.iter().map(stats_json).collect::<Vec<_>>(),
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
