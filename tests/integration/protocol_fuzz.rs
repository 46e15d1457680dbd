//! The plugin socket under attack: random, malformed, truncated, huge and deeply nested bodies,
//! wrong types, and names with `..`, `/`, NUL, unicode or 10,000 bytes, sent to every endpoint.
//! The daemon must answer each with JSON (an Err where it refuses), never panic or hang, and
//! create nothing but volumes with valid names inside its own directories.

use std::time::Duration;

use crate::common::daemon::{Daemon, StoreKind, call};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Docker's endpoints, as the server knows them, and two it must refuse.
fn endpoints() -> Vec<&'static str> {
    let mut all = cairn_driver::server::ENDPOINTS.to_vec();
    all.extend(["/VolumeDriver.Nope", "/../../etc/passwd"]);
    all
}

/// Names an attacker would try.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just("../escape".to_string()),
        Just("a/b".to_string()),
        Just("nul\0byte".to_string()),
        Just(".cairn".to_string()),
        Just("x".repeat(10_000)),
        Just("ok-name".to_string()),
        "\\PC{0,40}",
        "[a-z0-9][a-z0-9_.-]{1,20}",
    ]
}

/// A JSON value of some depth, with wrong types where strings belong.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        name().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[A-Za-z]{1,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request body: a Docker-shaped one with hostile fields, or random JSON, or not JSON at all.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (
            name(),
            name(),
            prop::collection::btree_map(name(), name(), 0..4)
        )
            .prop_map(
                |(name, id, opts)| json!({"Name": name, "ID": id, "Opts": opts})
                    .to_string()
                    .into_bytes()
            ),
        value().prop_map(|v| json!({"Name": v.clone(), "ID": v.clone(), "Opts": v})
            .to_string()
            .into_bytes()),
        value().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..512),
        (1usize..20_000).prop_map(|depth| {
            let mut nested = "[".repeat(depth);
            nested.push_str(&"]".repeat(depth));
            nested.into_bytes()
        }),
        Just(b"{\"Name\": \"trunc".to_vec()),
    ]
}

#[test]
fn hostile_requests_get_clear_errors_and_change_nothing_outside() {
    let daemon = Daemon::start(StoreKind::Dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(endpoint in prop::sample::select(endpoints()), body in body())| {
        let socket = daemon.socket.clone();
        let answer = runtime.block_on(async move {
            let request = call(&socket, endpoint, body.into());
            tokio::time::timeout(Duration::from_secs(30), request).await
        });
        let (status, answer) = answer.expect("an answer within 30 s");
        prop_assert!(matches!(status, 200 | 400 | 404 | 413), "{status}: {answer}");
        if status != 200 {
            prop_assert!(answer["Err"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
        }
    });

    // Still answering, and whatever was created has a valid name, inside cairn's folders.
    let (status, listed) = daemon.call("/VolumeDriver.List", "{}");
    assert_eq!(status, 200);
    let valid = |name: &str| {
        name.len() >= 2
            && name.len() <= 128
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    };
    for volume in listed["Volumes"].as_array().unwrap() {
        let name = volume["Name"].as_str().unwrap();
        assert!(valid(name), "a volume named {name:?}");
        assert!(
            volume["Mountpoint"]
                .as_str()
                .unwrap()
                .starts_with(daemon.state_dir.to_str().unwrap())
        );
    }
    let root = std::path::PathBuf::from(daemon.store_spec.trim_start_matches("dir://"));
    let parent = root.parent().unwrap();
    for entry in std::fs::read_dir(parent).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            ["store", "state", "config.toml", "cairn.sock", "serve.log"].contains(&name.as_str()),
            "something new beside cairn's folders: {name}"
        );
    }
    for entry in std::fs::read_dir(&root).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            valid(&name) || name.starts_with('.') || name == "%2Ecairn",
            "a store folder named {name:?}"
        );
    }
}
