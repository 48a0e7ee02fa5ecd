//! Real FHIR clients against an endpoint's public URL, trusting only the
//! test's CA: curl for single requests, PyPI fhirpy for paging, and the
//! PyPI sekmet-fhir `conformance_smoke` suite (both from `e2e/venv.sh`).
//! Shared by the loopback test (`tests/fhir_server.rs`) and the node test
//! (`tests/node_endpoint.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub use crate::postgres::run;

/// One HTTP answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// curl against `public_url`, trusting only `ca`, with `api_key` for
/// [`Client::keyed`]. Scratch files go to `dir`.
#[derive(Debug, Clone)]
pub struct Client {
    pub curl: PathBuf,
    pub ca: PathBuf,
    pub public_url: String,
    pub api_key: String,
    pub dir: PathBuf,
}

impl Client {
    /// `method` on `path` (relative to the public URL) with `headers`.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> Response {
        self.try_request(method, path, headers, body).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// As [`Client::request`], with a transport failure (refused, reset,
    /// TLS) as an error instead of a panic.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Response> {
        let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id());
        let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).collect();
        let head = self.dir.join(format!("response-{tag}.headers"));
        let out = self.dir.join(format!("response-{tag}.body"));
        let mut command = Command::new(&self.curl);
        command
            .args(["--silent", "--show-error", "--max-time", "60", "--request", method, "--cacert"])
            .arg(&self.ca)
            .arg("--dump-header")
            .arg(&head)
            .arg("--output")
            .arg(&out)
            .args(["--write-out", "%{http_code}"]);
        for (name, value) in headers {
            command.arg("--header").arg(format!("{name}: {value}"));
        }
        if let Some(body) = body {
            command.args(["--header", "Content-Type: application/fhir+json", "--data-binary"]).arg(body.to_string());
        }
        command.arg(format!("{}{path}", self.public_url));
        let output = run(&mut command)?;
        let status = String::from_utf8_lossy(&output.stdout).trim().parse().context("status code")?;
        let headers = std::fs::read_to_string(&head)
            .context("headers")?
            .lines()
            .filter_map(|l| l.split_once(':').map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned())))
            .collect();
        let body = std::fs::read_to_string(&out).unwrap_or_default();
        let _ = std::fs::remove_file(&head);
        let _ = std::fs::remove_file(&out);
        Ok(Response { status, headers, body })
    }

    /// With the client's API key, asking for FHIR JSON.
    pub fn keyed(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        self.request(method, path, &[("X-API-Key", &self.api_key), ("Accept", "application/fhir+json")], body)
    }

    /// Whether a TLS 1.2 handshake is refused (the gateway speaks 1.3 only).
    pub fn tls12_refused(&self) -> bool {
        Command::new(&self.curl)
            .args(["--silent", "--tls-max", "1.2", "--cacert"])
            .arg(&self.ca)
            .arg(format!("{}/metadata", self.public_url))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(false)
    }
}

pub fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family, "given": ["Test"]}],
        "identifier": [{"system": "urn:fhir-operator:e2e", "value": family}]})
}

pub fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"].as_array()?.iter().find(|l| l["relation"] == "next")?["url"].as_str().map(str::to_owned)
}

/// Points requests (fhirpy) and OpenSSL (httpx, under sekmet) at the
/// test's CA instead of the system's.
pub fn python_env(command: &mut Command, ca: &Path) {
    command
        .env("REQUESTS_CA_BUNDLE", ca)
        .env("SSL_CERT_FILE", ca)
        .env_remove("SSL_CERT_DIR")
        .env_remove("CURL_CA_BUNDLE");
}

/// fhirpy reads the first page of Patients (one per page) and then every
/// page: `{"first": n, "next": [url], "ids": [sorted ids]}`. fhirpy refuses
/// links off its base URL, so this fails when the server's links leave it.
pub fn fhirpy_pages(python: &Path, public_url: &str, api_key: &str, ca: &Path) -> Result<Value> {
    let script = r#"
import json, sys
from fhirpy import SyncFHIRClient
url, key = sys.argv[1], sys.argv[2]
client = SyncFHIRClient(url, extra_headers={"X-API-Key": key})
first = client.resources("Patient").limit(1).fetch_raw()
next_url = [l["url"] for l in first.get("link", []) if l["relation"] == "next"]
every = client.resources("Patient").limit(1).fetch_all()
print(json.dumps({"first": len(first.get("entry", [])), "next": next_url, "ids": sorted(p.id for p in every)}))
"#;
    let mut command = Command::new(python);
    command.args(["-c", script, public_url, api_key]);
    python_env(&mut command, ca);
    serde_json::from_slice(&run(&mut command)?.stdout).context("fhirpy's JSON")
}

/// What sekmet-fhir's `conformance_smoke` printed, and its step counts.
#[derive(Debug)]
pub struct Smoke {
    pub passed: usize,
    pub failed: usize,
    pub warnings: usize,
    pub skipped: usize,
    pub output: String,
}

/// Runs the `conformance_smoke` scenario against `public_url` with the key,
/// in `dir` (its settings, database and reports).
pub fn conformance_smoke(sekmet: &Path, dir: &Path, public_url: &str, api_key: &str, ca: &Path) -> Result<Smoke> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("settings.yaml"),
        format!(
            "db_path: {}\npeers:\n  gateway:\n    base_url: {public_url}\n    headers:\n      X-API-Key: \"{api_key}\"\n",
            dir.join("sekmet.db").display()
        ),
    )?;
    let mut command = Command::new(sekmet);
    command
        .args(["scenario", "run", "conformance_smoke", "--peer", "gateway", "--no-serve", "--report-dir", "reports"])
        .env("SEKMET_CONFIG", dir.join("settings.yaml"))
        .env("NO_COLOR", "1")
        .current_dir(dir);
    python_env(&mut command, ca);
    let output = command.output().context("run sekmet")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    let count = |word: &str| text.lines().filter(|l| l.trim_start().starts_with(word)).count();
    let smoke = Smoke {
        passed: count("PASSED"),
        failed: count("FAILED") + count("ERROR"),
        warnings: count("WARNING"),
        skipped: count("SKIPPED"),
        output: text.clone(),
    };
    if !output.status.success() {
        bail!("conformance_smoke failed ({}):\n{text}", output.status);
    }
    Ok(smoke)
}

/// A test CA and a server certificate it signed for `subject_alt_names`
/// (`DNS:…`, `IP:…`), made with the openssl CLI in `dir`: the paths of
/// `ca.crt`, `tls.crt` and `tls.key`.
pub struct TestCertificate {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn issue_certificate(openssl: &Path, dir: &Path, subject_alt_names: &[&str]) -> Result<TestCertificate> {
    let file = |name: &str| dir.join(name);
    let (ca_key, ca, key, csr, cert, ext) =
        (file("ca.key"), file("ca.crt"), file("tls.key"), file("tls.csr"), file("tls.crt"), file("ext.cnf"));
    run(Command::new(openssl)
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=fhir-operator e2e CA", "-keyout"])
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca))?;
    run(Command::new(openssl)
        .args(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=fhir-e2e"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr))?;
    std::fs::write(&ext, format!("subjectAltName={}\n", subject_alt_names.join(",")))?;
    run(Command::new(openssl)
        .args(["x509", "-req", "-days", "1", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-CAcreateserial")
        .arg("-out")
        .arg(&cert)
        .arg("-extfile")
        .arg(&ext))?;
    Ok(TestCertificate { ca, cert, key })
}
