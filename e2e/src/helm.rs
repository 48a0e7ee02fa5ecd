//! Helm for the tests: the real Helm v4 Go SDK, through the pinned PyPI
//! package `helm-python-sdk` in the tests' virtualenv (`crate::venv`) and
//! the bridge `e2e/helm.py`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The chart in this repository.
pub fn chart_dir() -> PathBuf {
    crate::crate_dir().join("..").join("charts").join("fhir-operator")
}

/// A refusal by Helm itself (lint errors are data, not refusals).
#[derive(Debug, Clone)]
pub struct HelmError {
    pub kind: String,
    pub message: String,
}

/// Sends one request to the bridge: `Ok(Err(..))` is Helm saying no.
pub fn call(request: &Value) -> Result<Result<Value, HelmError>> {
    let bridge = crate::crate_dir().join("helm.py");
    let mut child = Command::new(crate::venv::tool("python")?)
        .arg(&bridge)
        // The bridge's directory first on sys.path, never the chart's.
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the Helm bridge")?;
    child.stdin.take().context("bridge stdin")?.write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the Helm bridge failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let answer: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("the Helm bridge answered: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(match answer.get("error") {
        Some(e) => Err(HelmError {
            kind: e["type"].as_str().unwrap_or_default().to_owned(),
            message: e["message"].as_str().unwrap_or_default().to_owned(),
        }),
        None => Ok(answer),
    })
}

fn expect(request: Value) -> Result<Value> {
    call(&request)?.map_err(|e| anyhow::anyhow!("Helm refused ({}): {}", e.kind, e.message))
}

/// `helm lint` of the chart: `{"messages": [{"severity", "path", "error"}], "errors": [...]}`.
pub fn lint(values: &Value, strict: bool) -> Result<Value> {
    expect(json!({"op": "lint", "chart": chart_dir(), "values": values, "strict": strict, "namespace": "fhir-system"}))
}

/// `helm template`: rendered manifests by template path, offline.
pub fn render(values: &Value, name: &str, namespace: &str) -> Result<Result<BTreeMap<String, String>, HelmError>> {
    let answer =
        call(&json!({"op": "render", "chart": chart_dir(), "values": values, "name": name, "namespace": namespace}))?;
    Ok(match answer {
        Ok(map) => Ok(serde_json::from_value(map).context("rendered manifests")?),
        Err(e) => Err(e),
    })
}

/// `helm install` (or, with `dry_run: Some("server")`, the manifest Helm
/// would install, rendered with the cluster's real API versions).
pub fn install(kubeconfig: &Path, values: &Value, name: &str, namespace: &str, dry_run: Option<&str>) -> Result<Value> {
    expect(json!({"op": "install", "chart": chart_dir(), "values": values, "name": name, "namespace": namespace,
                  "kubeconfig": kubeconfig, "dry_run": dry_run}))
}

pub fn upgrade(kubeconfig: &Path, values: &Value, name: &str, namespace: &str) -> Result<Value> {
    expect(json!({"op": "upgrade", "chart": chart_dir(), "values": values, "name": name, "namespace": namespace,
                  "kubeconfig": kubeconfig}))
}

pub fn uninstall(kubeconfig: &Path, name: &str, namespace: &str) -> Result<Value> {
    expect(json!({"op": "uninstall", "name": name, "namespace": namespace, "kubeconfig": kubeconfig}))
}

/// The objects of rendered manifests, in order (empty documents dropped).
pub fn objects(manifests: impl IntoIterator<Item = impl AsRef<str>>) -> Result<Vec<Value>> {
    use serde::Deserialize;
    let mut found = Vec::new();
    for text in manifests {
        for doc in serde_yaml::Deserializer::from_str(text.as_ref()) {
            let value = Value::deserialize(doc).context("a rendered manifest is not YAML")?;
            if !value.is_null() {
                found.push(value);
            }
        }
    }
    Ok(found)
}
