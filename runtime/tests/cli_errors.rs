//! What the `sluice` binary says when the place it should read from is not
//! there: a mistyped redb path (read-only commands create nothing), S3
//! without usable credentials, an unreachable S3 endpoint. Each is one
//! short error naming what is missing and how to set it. No S3 server is
//! needed: none of these requests gets anywhere.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `sluice` in `cwd` with no AWS settings from this environment
/// (credentials, profiles, endpoint, log filter) besides `env`.
fn sluice(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.current_dir(cwd).args(args);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("AWS_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    // No ~/.aws files: the profile provider finds nothing.
    cmd.env("HOME", cwd)
        .env("AWS_CONFIG_FILE", cwd.join("no-aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", cwd.join("no-aws-credentials"));
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run sluice");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lines(text: &str) -> usize {
    text.lines().filter(|l| !l.trim().is_empty()).count()
}

#[test]
fn read_only_commands_with_a_missing_redb_file_fail_naming_it_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo").join("checkpoints.redb");
    let copy_to = dir.path().join("copy.redb");
    let spec = format!("redb:{}", missing.display());
    let runs: [Vec<String>; 4] = [
        vec!["inspect".into(), format!("{spec}#sp-1")],
        vec!["inspect".into(), format!("{spec}#chk-1"), "--json".into()],
        vec![
            "checkpoints".into(),
            "list".into(),
            "--storage".into(),
            spec.clone(),
        ],
        vec![
            "copy".into(),
            format!("{spec}#sp-1"),
            format!("redb:{}#sp-1", copy_to.display()),
        ],
    ];
    for args in runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = sluice(dir.path(), &args, &[]);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("no such file") && err.contains(&missing.display().to_string()),
            "{args:?}: the error should name the missing file:\n{err}"
        );
        assert!(lines(&err) <= 2, "{args:?}: {err}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
        assert!(
            !missing.parent().unwrap().exists(),
            "{args:?} created its directory"
        );
        assert!(!copy_to.exists(), "{args:?} created the copy's destination");
        assert!(
            !dir.path().join("sluice-data").exists(),
            "{args:?} created ./sluice-data"
        );
    }
    // The default storage of `checkpoints list` is not created either.
    let (code, _, err) = sluice(dir.path(), &["checkpoints", "list"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no such file") && err.contains("checkpoints.redb"),
        "{err}"
    );
    assert!(
        !dir.path().join("sluice-data").exists(),
        "./sluice-data was created"
    );
}

/// A TCP port where something accepts connections and never answers (an
/// instance-metadata endpoint that hangs, as on many machines outside EC2).
fn silent_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    port
}

/// A TCP port where nothing listens.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn s3_without_credentials_is_one_short_error_naming_the_variables_that_set_them() {
    let dir = tempfile::tempdir().unwrap();
    let imds = format!("http://127.0.0.1:{}", silent_port());
    let storage = "s3://sluice-no-credentials/jobs";
    let envs: [&[(&str, &str)]; 2] = [
        // Instance metadata switched off.
        &[("AWS_EC2_METADATA_DISABLED", "true")],
        // Instance metadata left on (the default) but not answering.
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.as_str())],
    ];
    for env in envs {
        for args in [
            vec!["checkpoints", "list", "--storage", storage],
            vec!["inspect", "s3://sluice-no-credentials/jobs/sp-1"],
        ] {
            let started = Instant::now();
            let (code, out, err) = sluice(dir.path(), &args, env);
            assert_eq!(code, 2, "{env:?} {args:?}: {out}{err}");
            assert!(lines(&err) <= 2, "{env:?} {args:?}: more than two lines:\n{err}");
            for needle in [
                "no usable AWS credentials",
                "sluice-no-credentials",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_PROFILE",
            ] {
                assert!(
                    err.contains(needle),
                    "{env:?} {args:?}: {needle:?} missing:\n{err}"
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{env:?} {args:?}: took {:?}",
                started.elapsed()
            );
        }
    }
    // The details stay available.
    let mut debug = envs[0].to_vec();
    debug.push(("RUST_LOG", "debug"));
    let (_, _, err) = sluice(dir.path(), &["checkpoints", "list", "--storage", storage], &debug);
    assert!(
        err.contains("no credentials found in chain"),
        "RUST_LOG=debug shows the chain:\n{err}"
    );
}

#[test]
fn s3_at_an_unreachable_endpoint_is_one_short_error_naming_it_and_how_to_set_it() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-0123456789"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let copy_to = dir.path().join("copy.redb");
    let copy_to = format!("redb:{}#sp-1", copy_to.display());
    for args in [
        vec![
            "checkpoints",
            "list",
            "--storage",
            "s3://bucket/jobs",
            "--s3-endpoint",
            &endpoint,
        ],
        vec!["inspect", "s3://bucket/jobs/sp-1", "--s3-endpoint", &endpoint],
        vec![
            "copy",
            "s3://bucket/jobs/sp-1",
            &copy_to,
            "--s3-endpoint",
            &endpoint,
        ],
    ] {
        let (code, out, err) = sluice(dir.path(), &args, &env);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(lines(&err) <= 2, "{args:?}: more than two lines:\n{err}");
        for needle in [
            endpoint.as_str(),
            "cannot reach",
            "--s3-endpoint",
            "AWS_ENDPOINT_URL",
        ] {
            assert!(err.contains(needle), "{args:?}: {needle:?} missing:\n{err}");
        }
        assert!(!err.contains("not-a-real-secret"), "the secret leaked:\n{err}");
    }
    assert!(
        !dir.path().join("copy.redb").exists(),
        "copy created its destination"
    );
    // The same through AWS_ENDPOINT_URL.
    let mut env = env.to_vec();
    env.push(("AWS_ENDPOINT_URL", endpoint.as_str()));
    let (code, _, err) = sluice(
        dir.path(),
        &["checkpoints", "list", "--storage", "s3://bucket/jobs"],
        &env,
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        lines(&err) <= 2 && err.contains(&endpoint) && err.contains("AWS_ENDPOINT_URL"),
        "{err}"
    );
}
