//! The dashboard at `GET /`: one HTML page with its script and styles
//! embedded in the binary (no build step, no other server, nothing fetched
//! from elsewhere). It polls the REST API once a second: job status and
//! uptime, throughput and backpressure over time (drawn as SVG), every
//! task's rates, the checkpoint history with per-task detail on click
//! (failed ones with their cause), restarts with causes and restore points,
//! and buttons for trigger checkpoint / savepoint / stop-with-savepoint /
//! cancel. Opened as `/?token=TOKEN`, it sends the token with its requests.

use axum::response::Html;

/// The page.
pub const PAGE: &str = include_str!("dashboard.html");

/// `GET /`.
pub(super) async fn page() -> Html<&'static str> {
    Html(PAGE)
}
