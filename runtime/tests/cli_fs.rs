//! The `sluice` binary on a directory storage (`file:`): a job with an
//! injected failure, a savepoint into a `file:` target moved with `cp -r`
//! and resumed at another parallelism, and read-only tools on a mistyped
//! path.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `sluice` in a scratch working directory (any default
/// `./sluice-data` goes there).
fn sluice(args: &[&str]) -> (i32, String, String) {
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(cwd.path())
        .args(args)
        .output()
        .expect("run sluice");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn committed_checkpoints(root: &Path) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().join("_metadata").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn keyed_sum_on_a_file_storage_restores_after_an_injected_failure_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let storage = format!("file:{}", root.display());
    let (code, out, err) = sluice(&[
        "run",
        "keyed-sum",
        "--storage",
        &storage,
        "--state",
        "memory",
        "--events",
        "400000",
        "--keys",
        "1000",
        "--checkpoint-interval",
        "5ms",
        "--retained",
        "2",
        "--fail-after",
        "300000",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains(&format!("storage {storage}")), "{out}");
    assert!(
        out.contains("restored from checkpoint"),
        "the recovery is reported:\n{out}"
    );
    assert!(out.contains("exactly-once: ok"), "{out}");
    // The retained checkpoints are plain directories with their metadata.
    let on_disk = committed_checkpoints(&root);
    assert_eq!(on_disk.len(), 2, "{on_disk:?}");
    assert!(on_disk.iter().all(|d| d.starts_with("chk-")), "{on_disk:?}");
    let (code, out, err) = sluice(&["checkpoints", "list", "--storage", &storage]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 completed checkpoints"), "{out}");
    // A bare absolute path is the same storage.
    let (code, out, err) = sluice(&["checkpoints", "list", "--storage", &root.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 completed checkpoints"), "{out}");
}

#[test]
fn a_savepoint_in_a_directory_moved_with_cp_resumes_at_another_parallelism_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = |f: &str| dir.path().join(f).display().to_string();
    let events = "2000000";
    let common = [
        "run",
        "keyed-sum",
        "--events",
        events,
        "--keys",
        "2000",
        "--state",
        "memory",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(dir.path())
        .args(common)
        .args([
            "--checkpoint-interval",
            "100ms",
            "--rate",
            "400000",
            "--rest",
            "0",
        ])
        .args(["--storage", &format!("file:{}", path("chk"))])
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
    let (code, out, err) = sluice(&["checkpoint", "--job", &url]);
    assert_eq!(code, 0, "{out}{err}");
    let target = format!("file:{}", path("savepoints"));
    let (code, out, err) = sluice(&["savepoint", "--job", &url, "--stop", &target]);
    assert_eq!(code, 0, "{out}{err}");
    let sp = out
        .split_whitespace()
        .find(|w| w.starts_with("file:"))
        .expect("the savepoint's address")
        .to_string();
    let status = child.wait().unwrap();
    let job_out = rest.join().unwrap().join("\n");
    assert!(status.success(), "{job_out}");
    assert!(job_out.contains("stopped with savepoint"), "{job_out}");

    // The savepoint is a directory of plain files under the target.
    let name = sp.rsplit('/').next().unwrap().to_string();
    assert!(name.starts_with("savepoint-"), "{sp}");
    assert_eq!(sp, format!("{target}/{name}"));
    let sp_dir = dir.path().join("savepoints").join(&name);
    assert!(sp_dir.join("_metadata").is_file(), "{}", sp_dir.display());

    // Moved with cp -r (no Sluice code), it still inspects and restores.
    let moved = dir.path().join("moved");
    let cp = Command::new("cp")
        .arg("-r")
        .arg(&sp_dir)
        .arg(&moved)
        .status()
        .unwrap();
    assert!(cp.success());
    let moved_sp = format!("file:{}", moved.display());
    let (code, out, err) = sluice(&["inspect", &moved_sp]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("savepoint "), "{out}");
    assert!(out.contains("running-sum (keyed by u64, parallelism 2"), "{out}");
    let storage2 = format!("file:{}", path("chk2"));
    let mut resume = common.to_vec();
    resume.extend([
        "--parallelism",
        "3",
        "--storage",
        &storage2,
        "--from-savepoint",
        &moved_sp,
    ]);
    let (code, out, err) = sluice(&resume);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("started from savepoint"), "{out}");
    assert!(out.contains("exactly-once: ok"), "{out}");
    assert_eq!(
        std::fs::read_dir(&sp_dir).unwrap().count(),
        std::fs::read_dir(&moved).unwrap().count(),
        "restoring changed nothing in the savepoint"
    );
}

#[test]
fn read_only_tools_on_a_missing_directory_fail_naming_it_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let named = missing.display().to_string();
    let file = format!("file:{named}");
    let cases: Vec<Vec<String>> = vec![
        vec![
            "checkpoints".into(),
            "list".into(),
            "--storage".into(),
            file.clone(),
        ],
        vec![
            "checkpoints".into(),
            "list".into(),
            "--storage".into(),
            named.clone(),
        ],
        vec!["inspect".into(), format!("{file}#chk-3")],
        vec!["inspect".into(), format!("{named}/savepoint-1-abcdef")],
        vec![
            "copy".into(),
            format!("{file}/savepoint-1-abcdef"),
            format!("file:{}", dir.path().join("copy").display()),
        ],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = sluice(&args);
        assert_ne!(code, 0, "{args:?} succeeded: {out}");
        assert!(
            err.contains(&named),
            "{args:?}: the message should name {named}:\n{err}"
        );
    }
    assert!(!missing.exists(), "a read-only tool created {named}");
    assert!(
        !dir.path().join("copy").exists(),
        "a failed copy created its destination"
    );
}

/// Every file under `root` with its bytes.
fn tree(root: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn rewrite_renames_and_drops_operators_into_a_new_savepoint_that_restores() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let storage = format!("file:{}", root.display());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "keyed-sum",
            "--state",
            "memory",
            "--events",
            "200000",
            "--keys",
            "500",
            "--checkpoint-interval",
            "5ms",
        ];
        args.extend_from_slice(extra);
        sluice(&args)
    };
    let (code, out, err) = run(&["--storage", &storage, "--retained", "1"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let chk = committed_checkpoints(&root).pop().unwrap();
    let src = format!("file:{}#{chk}", root.display());
    let before = tree(&root);
    let target = dir.path().join("rewritten");
    let dst = format!("file:{}#sp", target.display());

    // A bad plan names what is wrong and writes nothing.
    let (code, _, err) = sluice(&["rewrite", &src, &dst, "--drop-operator", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("\"nope\"") && err.contains("running-sum"), "{err}");
    let (code, _, err) = sluice(&["rewrite", &src, &dst, "--rename-operator", "running-sum"]);
    assert_ne!(code, 0);
    assert!(err.contains("OLD=NEW"), "{err}");
    assert!(!target.join("sp").exists() || tree(&target.join("sp")).is_empty());

    let (code, out, err) = sluice(&["rewrite", &src, &dst, "--rename-operator", "running-sum=totals"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("totals") && !out.contains("running-sum"), "{out}");
    assert_eq!(tree(&root), before, "the source checkpoint is unchanged");
    let (code, out, err) = sluice(&["inspect", &dst]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("totals") && out.contains("savepoint"), "{out}");
    // The job's keyed operator is still `running-sum`: the renamed state is
    // not its own, and the job refuses to start without it unless told.
    let (code, out, err) = run(&["--storage", "memory", "--from-savepoint", &dst]);
    assert_ne!(code, 0, "stdout:\n{out}");
    assert!(err.contains("totals"), "{err}");
    // Renamed back, it restores (the job then ends at once: its source
    // positions are at the end).
    let back = format!("file:{}#back", target.display());
    let (code, _, err) = sluice(&["rewrite", &dst, &back, "--rename-operator", "totals=running-sum"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&["--storage", "memory", "--from-savepoint", &back]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("exactly-once: ok"), "{out}");
}
