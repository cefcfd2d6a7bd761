//! The savepoint workflow through the `sluice` binary: a job with `--rest`,
//! `sluice status`, `sluice checkpoint`, `sluice savepoint` and `--stop`
//! over HTTP, `sluice inspect` (human, JSON, state dump), `sluice copy` to
//! another file, and `--from-savepoint` at another parallelism, ending
//! exactly-once.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sluice(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .expect("run sluice");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_running_cli_job_is_savepointed_stopped_inspected_copied_and_resumed_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = |f: &str| dir.path().join(f).display().to_string();
    let events = "10000000";
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "run",
            "keyed-sum",
            "--events",
            events,
            "--keys",
            "2000",
            "--state",
            "memory",
        ])
        .args(["--checkpoint-interval", "200ms", "--rest", "0"])
        .args(["--storage", &format!("redb:{}", path("chk.redb"))])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the job prints its REST address").unwrap();
        if let Some(i) = line.find("http://") {
            break line[i..].split_whitespace().next().unwrap().to_string();
        }
    };
    let rest: std::thread::JoinHandle<Vec<String>> =
        std::thread::spawn(move || lines.map_while(|l| l.ok()).collect());

    let started = Instant::now();
    let (code, out, err) = sluice(&["status", "--job", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("job keyed-sum: RUNNING"), "{out}");
    let (code, out, err) = sluice(&["checkpoint", "--job", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("checkpoint") && out.contains("completed"), "{out}");
    let target = format!("redb:{}#savepoints", path("sp.redb"));
    let (code, out, err) = sluice(&["savepoint", "--job", &url, &target]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("savepoint") && out.contains("completed at"), "{out}");
    let (code, out, err) = sluice(&["savepoint", "--job", &url, "--stop", &target]);
    assert_eq!(code, 0, "{out}{err}");
    let sp = out
        .split_whitespace()
        .find(|w| w.starts_with("redb:"))
        .expect("the savepoint's path")
        .to_string();
    let status = child.wait().unwrap();
    let job_out = rest.join().unwrap().join("\n");
    assert!(status.success(), "{job_out}");
    assert!(job_out.contains("stopped with savepoint"), "{job_out}");
    assert!(started.elapsed() < Duration::from_secs(120));

    // Inspect: human form, JSON, and the state as JSON lines.
    let (code, out, err) = sluice(&["inspect", &sp]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("savepoint "), "{out}");
    assert!(out.contains("events (source, 8 splits, parallelism 2)"), "{out}");
    assert!(
        out.contains("running-sum (keyed by u64, parallelism 2; states: sum (value state of u64))"),
        "{out}"
    );
    let (code, out, _) = sluice(&["inspect", &sp, "--json"]);
    assert_eq!(code, 0);
    let meta: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(meta["kind"], "savepoint");
    let (code, out, err) = sluice(&["inspect", &sp, "--operator", "running-sum", "--dump"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!rows.is_empty() && rows.len() <= 2000);
    for r in &rows {
        assert_eq!(r["state"], "sum");
        assert!(r["key"].as_u64().unwrap() < 2000, "{r}");
        assert!(r["value"].as_u64().is_some(), "{r}");
        assert!(r["key_group"].as_u64().unwrap() < 128);
    }
    let (code, _, err) = sluice(&["inspect", &sp, "--operator", "nope", "--dump"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no operator nope") && err.contains("running-sum"),
        "{err}"
    );

    // Copy to another file and resume from the copy at parallelism 3.
    let copy = format!("redb:{}#moved/here", path("elsewhere.redb"));
    let (code, out, err) = sluice(&["copy", &sp, &copy]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = sluice(&[
        "run",
        "keyed-sum",
        "--events",
        events,
        "--keys",
        "2000",
        "--state",
        "memory",
        "--parallelism",
        "3",
        "--storage",
        &format!("redb:{}", path("chk2.redb")),
        "--from-savepoint",
        &copy,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("started from savepoint"), "{out}");
    assert!(out.contains("exactly-once: ok"), "{out}");

    // A savepoint path that is not one: a clear error, no job.
    let (code, out, err) = sluice(&[
        "run",
        "keyed-sum",
        "--state",
        "memory",
        "--storage",
        &format!("redb:{}", path("chk3.redb")),
        "--from-savepoint",
        &format!("redb:{}#nothing", path("sp.redb")),
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("nothing/_metadata"), "{err}");
}
