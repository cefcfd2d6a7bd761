//! The REST API of a running job (feature `rest`), after Flink's: status,
//! checkpoint history and statistics, and triggers for a checkpoint, a
//! savepoint, stop-with-savepoint and cancel. Plus [`RestClient`], what the
//! CLI's `status` / `checkpoint` / `savepoint` / `cancel` commands use.
//!
//! **It has no authentication and no TLS.** [`serve`] binds where it is
//! told; the CLI binds to loopback unless given another address, and warns
//! then. Anyone who can reach the port can stop or cancel the job.
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /job` | | [`JobStatus`](crate::JobStatus) |
//! | `GET /checkpoints` | | counts, latest completed, history (oldest first) |
//! | `POST /checkpoints` | | `{"id": n}` once checkpoint `n` completed |
//! | `POST /savepoints` | `{"target": "s3://b/p", "stop": false}` | `{"id": n, "location": "…"}` once complete |
//! | `POST /stop` | `{"target": "…"}` | as `/savepoints` with `"stop": true`; the job then ends |
//! | `POST /cancel` | | `{"cancelled": true}` |
//!
//! Errors answer `{"error": "…"}` with 400 (bad request or target), 409
//! (the job cannot take it now) or 500 (the checkpoint or savepoint failed).
//! Triggers answer when the checkpoint or savepoint is complete (they can
//! take as long as the checkpoint timeout).

use crate::error::RuntimeError;
use crate::handle::{CheckpointStats, CheckpointStatus, JobMonitor, JobState};
use crate::savepoint::SavepointLocation;
use axum::extract::State;
use axum::http::StatusCode;
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
}

type Reply = (StatusCode, Json<Value>);

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    (status, Json(json!({ "error": message.into() })))
}

/// Serves the API of the job `monitor` watches on `addr` (port 0: any free
/// port) until the returned task is aborted. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    monitor: JobMonitor,
    resolve: TargetResolver,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let api = Arc::new(Api { monitor, resolve });
    let app = Router::new()
        .route("/job", get(job))
        .route("/checkpoints", get(checkpoints).post(trigger_checkpoint))
        .route("/savepoints", post(savepoint))
        .route("/stop", post(stop))
        .route("/cancel", post(cancel))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("REST API on {local} stopped: {e}");
        }
    });
    Ok((local, task))
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
        }
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
        let r = self.agent.get(&format!("{}{path}", self.base)).call();
        self.answer(path, r)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: Value) -> crate::Result<Value> {
        let r = self.agent.post(&format!("{}{path}", self.base)).send_json(&body);
        self.answer(path, r)
    }
}
