//! `cairn store check` as a user runs it: the binary against a real S3 server (moto over HTTP),
//! a dir store, the embedded default store, and the three ways a store setup goes wrong.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use cairn_testkit::{S3Server, free_port};

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_ENDPOINT_URL")
        .output()
        .expect("run the cairn binary")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every step of a passing check is printed as ok, in order.
fn assert_all_steps_ok(stdout: &str) {
    let steps: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .skip(1)
        .take(6)
        .collect();
    assert_eq!(
        steps,
        ["open", "list", "put", "get", "list", "delete"],
        "{stdout}"
    );
    assert!(
        stdout.lines().skip(1).take(6).all(|l| l.contains(" ok ")),
        "{stdout}"
    );
    assert!(stdout.contains("the store works"), "{stdout}");
}

#[test]
fn version_is_printed() {
    let output = cairn(&["--version"]);
    assert!(output.status.success());
    assert_eq!(
        text(&output).0.trim(),
        format!("cairn {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_passes_against_s3_over_http() {
    let server = S3Server::shared();
    let spec = server.spec(&S3Server::unique_prefix("check"));
    let output = cairn(&["store", "check", &spec]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_all_steps_ok(&stdout);
}

#[test]
fn check_passes_on_a_dir_store_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("dir://{}", dir.path().display());
    let output = cairn(&["store", "check", &spec]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_all_steps_ok(&stdout);
    let listing = Command::new("find")
        .arg(dir.path())
        .args(["-type", "f", "-not", "-name", ".lock"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&listing.stdout),
        "",
        "the check cleaned up"
    );
}

#[test]
fn the_embedded_default_store_is_created_private() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state");
    let output = cairn(&["--state-dir", state_dir.to_str().unwrap(), "store", "check"]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_all_steps_ok(&stdout);
    let mode = std::fs::metadata(state_dir.join("store"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "the default store directory is 0700");
}

#[test]
fn a_wrong_endpoint_names_the_step_the_error_and_a_hint() {
    let server = S3Server::shared();
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let spec = server
        .spec(&S3Server::unique_prefix("check"))
        .replace(&server.endpoint, &nobody);
    let output = cairn(&["store", "check", &spec]);
    let (stdout, stderr) = text(&output);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("list     FAILED"), "{stdout}");
    assert!(
        stderr.contains("error: list failed: store unavailable"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Connection refused"),
        "the store's own words: {stderr}"
    );
    assert!(
        stderr.contains(&format!("hint: nothing usable answered at {nobody}")),
        "{stderr}"
    );
}

#[test]
fn a_missing_bucket_says_so_and_how_to_create_it() {
    let server = S3Server::shared();
    let spec = server.spec_for_bucket("no-such-bucket-here", "vols");
    let output = cairn(&["store", "check", &spec]);
    let (stdout, stderr) = text(&output);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stderr.contains("NoSuchBucket"),
        "the store's code: {stderr}"
    );
    assert!(
        stderr.contains("hint: the bucket \"no-such-bucket-here\" does not exist"),
        "{stderr}"
    );
    assert!(
        stderr.contains("aws s3 mb s3://no-such-bucket-here"),
        "{stderr}"
    );
}

#[test]
fn bad_credentials_are_named_as_such() {
    let strict = S3Server::with_strict_auth();
    let spec = strict.spec("vols");
    let output = cairn(&["store", "check", &spec]);
    let (stdout, stderr) = text(&output);
    assert!(!output.status.success(), "{stdout}");
    assert!(stderr.contains("access denied"), "{stderr}");
    assert!(
        stderr.contains("InvalidAccessKeyId"),
        "the store's code: {stderr}"
    );
    assert!(
        stderr.contains("hint: the store refused the credentials"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("cairntestsecret"),
        "no secret in the output: {stderr}"
    );
}

#[test]
fn a_malformed_spec_is_refused_before_anything_runs() {
    let output = cairn(&["store", "check", "s3://bucket?access_key=AKIA"]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(stderr.contains("looks like a credential"), "{stderr}");
}
