//! The `sluice` binary end to end.

use std::process::Command;

fn sluice(args: &[&str]) -> (i32, String, String) {
    // Any default ./sluice-data goes to a scratch directory.
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

#[test]
fn keyed_sum_with_an_injected_failure_restores_from_a_checkpoint_and_is_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("redb:{}", dir.path().join("chk.redb").display());
    let state = dir.path().join("state").display().to_string();
    let (code, out, err) = sluice(&[
        "run",
        "keyed-sum",
        "--storage",
        &storage,
        "--state-dir",
        &state,
        "--events",
        "400000",
        "--keys",
        "1000",
        "--checkpoint-interval",
        "5ms",
        "--fail-after",
        "300000",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("checkpoint 1 completed"),
        "checkpoints are logged:\n{err}"
    );
    assert!(err.contains("failed after"), "the failure is logged:\n{err}");
    assert!(
        out.contains("restored from checkpoint"),
        "the recovery is reported:\n{out}"
    );
    assert!(out.contains("exactly-once: ok"), "{out}");
}

#[test]
fn bad_arguments_get_a_clear_message_and_a_non_zero_exit() {
    for (args, needle) in [
        (
            vec!["run", "keyed-sum", "--checkpoint-interval", "soon"],
            "--checkpoint-interval",
        ),
        (vec!["run", "keyed-sum", "--keys", "0"], "--keys"),
        (vec!["run", "keyed-sum", "--parallelism", "0"], "--parallelism"),
        (vec!["run", "keyed-sum", "--storage", "ftp://x"], "--storage"),
        (vec!["run", "keyed-sum", "--state", "rocksdb"], "--state"),
        (vec!["run", "keyed-sum", "--events", "many"], "--events"),
        (vec!["run", "no-such-job"], "no-such-job"),
    ] {
        let (code, out, err) = sluice(&args);
        assert_ne!(code, 0, "{args:?} succeeded: {out}");
        assert!(
            err.contains(needle),
            "{args:?}: the message should name {needle}:\n{err}"
        );
    }
}

#[test]
fn checkpoints_list_shows_the_retained_checkpoints_of_a_redb_store() {
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("redb:{}", dir.path().join("chk.redb").display());
    let state = dir.path().join("state").display().to_string();
    let (code, out, err) = sluice(&[
        "run",
        "keyed-sum",
        "--events",
        "200000",
        "--keys",
        "100",
        "--checkpoint-interval",
        "5ms",
        "--retained",
        "2",
        "--storage",
        &storage,
        "--state-dir",
        &state,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = sluice(&["checkpoints", "list", "--storage", &storage]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 completed checkpoints"), "{out}");
    let rows: Vec<&str> = out.lines().filter(|l| l.contains(" checkpoint ")).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows.iter().all(|r| r.contains('Z')), "times in UTC: {out}");
    // A file that is not a checkpoint store is refused, not overwritten.
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, b"notes").unwrap();
    let (code, _, err) = sluice(&[
        "checkpoints",
        "list",
        "--storage",
        &format!("redb:{}", notes.display()),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("notes.txt"), "{err}");
    assert_eq!(std::fs::read(&notes).unwrap(), b"notes");
}

/// Flips a byte in the middle of the first chunk of `file` inside the redb
/// checkpoint store at `store` (as a failing disk would).
fn flip_a_byte(store: &std::path::Path, file: &str) {
    sluice_backend_redb::damage_stored_file(store, file, |v| {
        let at = v.len() / 2;
        v[at] ^= 0x08;
    })
    .unwrap();
}

#[test]
fn exactly_once_output_survives_a_failure_and_a_corrupt_checkpoint_stops_the_resume_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chk.redb");
    let storage = format!("redb:{}", path.display());
    let output = dir.path().join("out");
    let output_arg = output.display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "keyed-sum",
            "--storage",
            &storage,
            "--state",
            "memory",
            "--events",
            "200000",
            "--keys",
            "500",
            "--checkpoint-interval",
            "5ms",
            "--rate",
            "400000",
            "--output",
            &output_arg,
        ];
        args.extend_from_slice(extra);
        sluice(&args)
    };
    // A failure in the middle: the committed output is still exactly-once.
    let (code, out, err) = run(&["--fail-after", "100000"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("restored from checkpoint"), "{out}");
    assert!(out.contains("output: 200000 committed lines"), "{out}");
    assert!(
        out.contains("output") && out.contains("exactly-once: ok"),
        "{out}"
    );
    // Damage the final checkpoint, whose output was committed, and resume.
    let latest = {
        let (code, out, err) = sluice(&["checkpoints", "list", "--storage", &storage]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .filter(|l| l.contains(" checkpoint "))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .max()
            .expect("a retained checkpoint")
    };
    flip_a_byte(&path, &format!("chk-{latest}/running-sum-0.kst"));
    let (code, out, err) = run(&["--resume"]);
    assert_eq!(code, 2, "the resume stops:\n{out}\n{err}");
    assert!(
        err.contains(&format!("checkpoint {latest} cannot be restored"))
            && err.contains(&format!("chk-{latest}/running-sum-0.kst"))
            && err.contains("--allow-checkpoint-fallback"),
        "names the checkpoint, the file and the way out:\n{err}"
    );
    // With the opt-in it falls back to the previous checkpoint, says that
    // this may duplicate output, and the output check reports the verdict
    // (duplicates if records were replayed past the older checkpoint).
    let (code, out, err) = run(&["--resume", "--allow-checkpoint-fallback"]);
    assert!(err.contains("may duplicate output"), "{err}");
    assert!(out.contains("; restored from checkpoint"), "{out}");
    let duplicated = out.contains("exactly-once: FAILED");
    assert_eq!(code, if duplicated { 1 } else { 0 }, "{out}\n{err}");
}
