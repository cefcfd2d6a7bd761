//! The `sluice` binary end to end.

use std::process::Command;

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
fn keyed_sum_with_an_injected_failure_restores_from_a_checkpoint_and_is_exactly_once() {
    let (code, out, err) = sluice(&[
        "run",
        "keyed-sum",
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
