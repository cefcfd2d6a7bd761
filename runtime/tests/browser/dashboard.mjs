// The dashboard in a real browser: starts `sluice run keyed-sum` with its
// REST API behind a token, opens the dashboard in headless Chromium
// (Debian's /usr/bin/chromium, driven by playwright-core), and checks that
// the checkpoint history shows the checkpoints the REST API reports, with
// their duration and full size, that "Trigger checkpoint" makes a
// checkpoint that then appears in the table, that a row opens its per-task
// detail, and that "Cancel" cancels the job.
// Saves a screenshot.
//
//   SLUICE_BIN=target/debug/sluice SCREENSHOT=/tmp/dashboard.png node dashboard.mjs
//
// Run by scripts/browser-test.sh, which installs what it needs.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const bin = process.env.SLUICE_BIN;
const screenshot = process.env.SCREENSHOT || join(tmpdir(), "sluice-dashboard.png");
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const token = "browser-test-" + Math.random().toString(36).slice(2);
if (!bin) throw new Error("set SLUICE_BIN to the sluice binary");

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// How the page writes numbers and byte sizes (dashboard.html's `num` and
// `bytes`), written again here so that the test checks the page.
const formatNumber = (n) => Number(n).toLocaleString("en-US", { maximumFractionDigits: 1 });
function formatBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
async function until(what, f, timeoutMs = 60_000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error("timed out waiting for " + what);
    await sleep(200);
  }
}

const dir = mkdtempSync(join(tmpdir(), "sluice-dashboard-"));
const job = spawn(bin, ["run", "keyed-sum", "--events", "2000000000", "--rate", "100000", "--fail-after", "250000",
  "--checkpoint-interval", "1s", "--rest", "0", "--rest-token", token], { cwd: dir });
let out = "";
job.stdout.on("data", (d) => { out += d; });
job.stderr.on("data", (d) => { out += d; });
let exited = null;
job.on("exit", (code, signal) => { exited = { code, signal }; });

let browser;
try {
  const base = await until("the REST address", () => {
    if (exited) throw new Error("the job exited early: " + out);
    return (out.match(/on (http:\/\/127\.0\.0\.1:\d+)/) || [])[1];
  });
  const rest = async (path, init = {}) => {
    const r = await fetch(base + path, Object.assign({}, init,
      { headers: Object.assign({ Authorization: "Bearer " + token }, init.headers || {}) }));
    assert.equal(r.status, 200, `${path}: HTTP ${r.status}`);
    return r.json();
  };
  // Without the token, the API refuses.
  assert.equal((await fetch(base + "/checkpoints")).status, 401);
  await until("two completed checkpoints and the restart",
    async () => (await rest("/checkpoints")).counts.completed >= 2 && (await rest("/job")).restarts === 1);

  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on("dialog", (d) => d.accept());
  await page.goto(`${base}/?token=${token}`);
  await page.waitForSelector("#checkpoint-history tbody tr[data-id]");
  assert.equal(await page.textContent("#job-state"), "RUNNING");

  // The table shows every completed checkpoint the REST API reports.
  const reported = (await rest("/checkpoints")).history.filter((c) => c.status === "COMPLETED").map((c) => String(c.id));
  assert.ok(reported.length >= 2);
  await page.waitForFunction((ids) => ids.every((id) =>
    document.querySelector(`#checkpoint-history tr[data-id="${id}"][data-status="COMPLETED"]`)), reported);
  const shown = await page.$$eval("#checkpoint-history tr[data-id]", (rows) => rows.map((r) => r.dataset.id));
  for (const id of reported) assert.ok(shown.includes(id), `checkpoint ${id} not in the table`);
  // Their duration and full size are the REST API's, as the page writes
  // them (the figures of a completed checkpoint no longer change).
  const columns = await page.$$eval("#checkpoint-history thead th", (th) => th.map((h) => h.textContent.trim()));
  const durationCol = columns.indexOf("duration (ms)"), sizeCol = columns.indexOf("full size");
  assert.ok(durationCol >= 0 && sizeCol >= 0, "columns: " + columns.join(", "));
  const cells = await page.$$eval('#checkpoint-history tr[data-id][data-status="COMPLETED"]', (rows, [d, s]) =>
    rows.map((r) => [r.dataset.id, r.children[d].textContent, r.children[s].textContent]), [durationCol, sizeCol]);
  const byId = new Map((await rest("/checkpoints")).history.map((c) => [String(c.id), c]));
  let compared = 0;
  for (const [id, duration, size] of cells) {
    const c = byId.get(id);
    assert.ok(c, `checkpoint ${id} is not in the REST API's history`);
    assert.equal(c.status, "COMPLETED", `checkpoint ${id}`);
    assert.equal(duration, formatNumber(c.duration_ms), `duration of checkpoint ${id}`);
    assert.equal(size, formatBytes(c.state_size), `full size of checkpoint ${id}`);
    assert.ok(c.state_size > 0, `checkpoint ${id} has state`);
    compared++;
  }
  assert.ok(compared >= reported.length, `compared ${compared} rows, ${reported.length} reported`);

  // "Trigger checkpoint": the answer names the checkpoint, which appears
  // completed in the table and in the REST API.
  await page.click("#trigger-checkpoint");
  const text = await page.waitForFunction(() => {
    const t = document.querySelector("#action-result").textContent;
    return /checkpoint \d+ completed/.test(t) && t;
  }, null, { timeout: 60_000 });
  const id = (await text.jsonValue()).match(/checkpoint (\d+)/)[1];
  await page.waitForSelector(`#checkpoint-history tr[data-id="${id}"][data-status="COMPLETED"]`);
  const triggered = (await rest("/checkpoints")).history.find((c) => String(c.id) === id);
  assert.equal(triggered.status, "COMPLETED");
  assert.equal(triggered.kind, "checkpoint");

  // A click on its row shows each task's part.
  await page.click(`#checkpoint-history tr[data-id="${id}"]`);
  await page.waitForSelector(`tr[data-detail-for="${id}"] tbody tr`);
  const tasks = await page.$$eval(`tr[data-detail-for="${id}"] tbody tr td:first-child`, (c) => c.map((x) => x.textContent));
  assert.deepEqual(tasks.slice().sort(), triggered.subtasks.map((s) => s.task).sort());
  assert.equal(tasks.length, 4);

  // The injected failure's restart, with its cause and restore point.
  const restarts = (await rest("/job")).restart_history;
  assert.equal(restarts.length, 1);
  const from = restarts[0].restored_from === null ? "" : String(restarts[0].restored_from);
  await page.waitForSelector(`#restarts-table td[data-restored-from="${from}"]`);
  assert.match(await page.textContent("#restarts-table tbody"), /injected failure/i);

  // The charts and task table are drawn from the live figures.
  await page.waitForFunction(() => document.querySelectorAll("#tasks tbody tr").length === 4);
  await page.waitForFunction(() => document.querySelector("#throughput-chart polyline"));
  await sleep(1500);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log("screenshot: " + screenshot);

  // "Cancel" (confirmed) cancels the job.
  await page.click("#cancel-job");
  await until("the job to end", () => exited, 60_000);
  assert.match(out, /cancel/i);
  console.log("dashboard browser test: ok (" + reported.length + " checkpoints in the table, triggered checkpoint " + id + ")");
} catch (e) {
  console.error("dashboard browser test failed: " + (e.stack || e));
  console.error("job output:\n" + out.slice(-4000));
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
  if (!exited) job.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
}
