//! The gateway's nginx configuration, proven against the real thing: nginx
//! (Debian package `nginx`), curl and openssl. `nginx -t` on every shape of
//! configuration, then a live nginx on loopback in front of a stub FHIR
//! server that reports what reached it.
//!
//! When the tests run as root, nginx runs as `nobody` (via `setpriv`): that
//! proves the configuration needs no privilege and writes nowhere but its
//! temp dir (nobody cannot write nginx's compiled-in paths under /var/lib,
//! /run or /var/log, so a forgotten one fails the start).
//!
//! A missing tool fails the test with the Debian package to install: these
//! claims are only worth anything against the real programs.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fhir_operator::fhirendpoint::gateway::{
    ACCESS_LOG_FIELDS, GatewayAuth, GatewayError, GatewaySettings, HEALTH_PATH, LimitKey, Limits, MAX_API_KEY_LEN,
    Rate, api_keys_map, nginx_conf,
};
use serde_json::Value;
use support::*;

/// 256-bit keys in the two shapes the operator issues: hex and base64url.
const ALPHA_KEY: &str = "9d5ed678fe57bcca610140957afab571b0b6fda2c5ea6ff5d7bfc1f2dd5b6d1e";
const BETA_KEY: &str = "Vq3x-Pz8_rT0kLm9NwYbC2dE5fGhJ7aS1uIoKpQyZxc";
const WRONG_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Stands for patient data in a FHIR search: must never reach a log.
const PATIENT_NAME: &str = "Wolfeschlegel";
/// Generous enough that only the rate-limit tests ever see a 429.
const RELAXED: Rate = Rate { per_second: 1000, burst: 1000 };

// ---------------------------------------------------------------------------
// The API-key map

fn pair(key: &str, client: &str) -> (String, String) {
    (key.to_owned(), client.to_owned())
}

#[test]
fn api_keys_map_is_sorted_quoted_and_renders_a_repeated_pair_once() {
    let keys = [pair(BETA_KEY, "beta"), pair(ALPHA_KEY, "alpha"), pair(BETA_KEY, "beta"), pair(WRONG_KEY, "alpha")];
    let map = api_keys_map(&keys).expect("valid keys render");
    let entries: Vec<&str> = map.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        entries,
        [
            format!("\"{WRONG_KEY}\" \"alpha\";"),
            format!("\"{ALPHA_KEY}\" \"alpha\";"),
            format!("\"{BETA_KEY}\" \"beta\";"),
        ],
        "sorted by client id then key, one line per pair"
    );
    let mut reversed = keys.clone();
    reversed.reverse();
    assert_eq!(api_keys_map(&reversed).unwrap(), map, "input order does not matter");
}

/// Keys nginx would misread: they could end the string or the directive,
/// start a variable, a comment, a block or a regular expression, or be too
/// weak. Each is refused naming the client, and the key stays secret.
#[test]
fn api_keys_map_refuses_unsafe_keys_naming_the_client_never_the_key() {
    let pad = "a".repeat(40);
    let unsafe_keys = [
        format!("{pad}\"; include /etc/shadow"),
        format!("{pad};"),
        format!("{pad}{{"),
        format!("{pad}}}"),
        format!("{pad} tail"),
        format!("{pad}\ttail"),
        format!("{pad}\nsecond \"line\";"),
        format!("{pad}\\"),
        format!("{pad}$client_id"),
        format!("{pad}#comment"),
        format!("{pad}'"),
        format!("~^{pad}"),
        format!("{pad}é"),
        String::new(),
        "default".to_owned(),
        "a".repeat(31),
        "a".repeat(MAX_API_KEY_LEN + 1),
    ];
    for key in unsafe_keys {
        let err = api_keys_map(&[pair(ALPHA_KEY, "alpha"), pair(&key, "mallory")])
            .expect_err(&format!("the key {key:?} must be refused"));
        assert!(matches!(&err, GatewayError::InvalidApiKey { client, .. } if client == "mallory"), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("\"mallory\""), "names the client: {message}");
        assert!(key.is_empty() || !message.contains(&key), "never shows the key: {message}");
        assert!(!format!("{err:?}").contains(&pad), "Debug does not show the key either: {err:?}");
    }
}

#[test]
fn api_keys_map_refuses_client_ids_that_could_break_the_file_or_the_log() {
    for client in ["", "a b", "a\"b", "a;b", "a{b", "a}b", "$client_id", "a\\b", "a\nb", "a'b", "ünï"] {
        let err = api_keys_map(&[pair(ALPHA_KEY, client)]).expect_err(&format!("client id {client:?} refused"));
        assert_eq!(err, GatewayError::InvalidClientId { client: client.to_owned() });
        assert!(!err.to_string().contains(ALPHA_KEY), "{err}");
    }
}

/// nginx compares map keys ignoring case, so a key differing only in case
/// would let one client in as another (or fail `nginx -t` printing the key).
#[test]
fn api_keys_map_refuses_one_key_for_two_clients_even_when_only_case_differs() {
    for other in [ALPHA_KEY.to_owned(), ALPHA_KEY.to_uppercase()] {
        let err = api_keys_map(&[pair(ALPHA_KEY, "alpha"), pair(&other, "beta")]).expect_err("shared key refused");
        assert_eq!(err, GatewayError::DuplicateApiKey { first: "alpha".into(), second: "beta".into() });
        assert!(!err.to_string().to_lowercase().contains(ALPHA_KEY), "{err}");
    }
}

// ---------------------------------------------------------------------------
// The configuration, rendered

fn rate(per_second: u32, burst: u32) -> Rate {
    Rate { per_second, burst }
}

fn limits(key: LimitKey, default: Rate, read: Option<Rate>, write: Option<Rate>) -> Limits {
    Limits { key, default, read, write, max_body_bytes: 1024 * 1024 }
}

/// Settings with every path under `dir`, as the tests lay it out.
fn settings_in(dir: &Path, listen: String, upstream: String, limits: Limits) -> GatewaySettings {
    let path = |name: &str| dir.join(name).to_str().expect("UTF-8 temp path").to_owned();
    GatewaySettings {
        listen,
        upstream,
        public_host: "patients.clinical.svc".into(),
        public_port: 443,
        tls_certificate: path("tls.crt"),
        tls_certificate_key: path("tls.key"),
        api_keys_map: path("api-keys.map"),
        temp_dir: path("run"),
        access_log: path("access.log"),
        access_log_syslog: None,
        limits,
        auth: None,
    }
}

fn example_settings() -> GatewaySettings {
    let limits = limits(LimitKey::Client, rate(10, 20), Some(rate(50, 100)), Some(rate(5, 0)));
    let mut settings = settings_in(Path::new("/var/run/fhir-gateway"), "8443".into(), "127.0.0.1:8080".into(), limits);
    settings.access_log_syslog = Some("127.0.0.1:5140".into());
    settings
}

#[test]
fn nginx_conf_is_deterministic() {
    let settings = example_settings();
    let first = nginx_conf(&settings).expect("renders");
    assert_eq!(nginx_conf(&settings.clone()).unwrap(), first, "same settings, same bytes");
    let mut other = settings.clone();
    other.limits.max_body_bytes += 1;
    assert_ne!(nginx_conf(&other).unwrap(), first, "the output does depend on the settings");
}

/// What `nginx -t` cannot see: the file's own promises about privilege,
/// where nginx writes, and TLS. The live tests prove the behaviour.
#[test]
fn nginx_conf_sets_no_user_no_daemon_and_writes_only_under_the_temp_dir() {
    let conf = nginx_conf(&example_settings()).unwrap();
    let directives: Vec<&str> = conf.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    for forbidden in ["user ", "daemon ", "master_process "] {
        assert!(!directives.iter().any(|d| d.starts_with(forbidden)), "no `{forbidden}` directive");
    }
    for writer in [
        "pid ",
        "client_body_temp_path ",
        "proxy_temp_path ",
        "fastcgi_temp_path ",
        "uwsgi_temp_path ",
        "scgi_temp_path ",
    ] {
        let line = directives.iter().find(|d| d.starts_with(writer)).unwrap_or_else(|| panic!("`{writer}` is set"));
        assert!(line.starts_with(&format!("{writer}/var/run/fhir-gateway/run/")), "{line}");
    }
    assert!(directives.contains(&"error_log stderr crit;"));
    assert_eq!(
        directives.iter().filter(|d| d.starts_with("ssl_protocols ")).collect::<Vec<_>>(),
        [&"ssl_protocols TLSv1.3;"]
    );
    assert_eq!(directives.iter().filter(|d| d.starts_with("listen ")).collect::<Vec<_>>(), [&"listen 8443 ssl;"]);
    assert!(directives.contains(&"access_log syslog:server=127.0.0.1:5140,tag=fhir_gateway fhir_audit;"));
}

#[test]
fn nginx_conf_refuses_settings_nginx_would_misread_or_that_switch_a_limit_off() {
    type Breakage = (&'static str, fn(&mut GatewaySettings));
    let breakages: [Breakage; 11] = [
        ("limits.default", |s| s.limits.default.per_second = 0),
        ("limits.read", |s| s.limits.read = Some(rate(0, 5))),
        ("limits.write", |s| s.limits.write = Some(rate(0, 5))),
        ("limits.max_body_bytes", |s| s.limits.max_body_bytes = 0),
        ("limits.max_body_bytes", |s| s.limits.max_body_bytes = u64::MAX),
        ("tls_certificate", |s| s.tls_certificate = "tls.crt".into()),
        ("tls_certificate_key", |s| s.tls_certificate_key = "/tls/my key.pem".into()),
        ("api_keys_map", |s| s.api_keys_map = "/keys;\n include /etc/shadow".into()),
        ("temp_dir", |s| s.temp_dir = "/tmp/$x".into()),
        ("listen", |s| s.listen = "8443 default_server".into()),
        ("access_log_syslog", |s| s.access_log_syslog = Some("127.0.0.1:5140,facility=auth".into())),
    ];
    for (field, breakage) in breakages {
        let mut settings = example_settings();
        breakage(&mut settings);
        match nginx_conf(&settings) {
            Err(GatewayError::InvalidSetting { field: named, .. }) => assert_eq!(named, field),
            other => panic!("{field}: expected InvalidSetting, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Tools and processes

#[test]
fn a_missing_tool_fails_the_test_naming_its_debian_package() {
    let missing = Tool { name: "fhir-gateway-no-such-tool", package: "no-such-package" };
    let panic = std::panic::catch_unwind(|| tool(&missing)).expect_err("a missing tool is no silent skip");
    let message = panic.downcast_ref::<String>().expect("a formatted panic message");
    assert!(message.contains("install the Debian package `no-such-package`"), "{message}");
}

/// Runs a command to completion and fails the test, with its output, unless
/// it succeeds.
fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Gives `dir` and everything in it to the user nginx runs as: its temp
/// dir is an emptyDir it owns in a pod, and it must read its key.
fn hand_to_nginx(dir: &Path) {
    if !running_as_root() {
        return;
    }
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).expect("chown");
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            hand_to_nginx(&path);
        } else {
            std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("chown");
        }
    }
}

/// Polls `check` every 20 ms until it gives a value or [`PATIENCE`] is up.
fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up after {PATIENCE:?} waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// A gateway on disk: certificate, key map, rendered configuration

/// Everything one nginx instance reads and writes, in one temp dir.
struct Site {
    dir: tempfile::TempDir,
    settings: GatewaySettings,
    conf: PathBuf,
    port: u16,
}

impl Site {
    fn new(limits: Limits, upstream_port: u16, syslog: Option<String>) -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut settings =
            settings_in(dir.path(), format!("127.0.0.1:{port}"), format!("127.0.0.1:{upstream_port}"), limits);
        settings.access_log_syslog = syslog;
        run(Command::new(tool(&OPENSSL))
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&settings.tls_certificate_key)
            .arg("-out")
            .arg(&settings.tls_certificate));
        // The longest key the map accepts proves nginx's map hash is sized for it.
        let longest = "L".repeat(MAX_API_KEY_LEN);
        let keys = [pair(ALPHA_KEY, "alpha"), pair(BETA_KEY, "beta"), pair(&longest, "longest")];
        std::fs::write(&settings.api_keys_map, api_keys_map(&keys).expect("key map")).expect("write key map");
        std::fs::create_dir(&settings.temp_dir).expect("temp dir for nginx");
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&settings).expect("configuration renders")).expect("write nginx.conf");
        hand_to_nginx(dir.path());
        Site { dir, settings, conf, port }
    }

    fn cert(&self) -> &str {
        &self.settings.tls_certificate
    }

    /// `nginx -t` on the rendered file, as the gateway would run it.
    fn nginx_t(&self) -> Output {
        run(unprivileged(&NGINX).arg("-t").arg("-c").arg(&self.conf).args(["-g", "daemon off;"]))
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(&self.settings.access_log).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// The stub FHIR server

/// What the stub upstream saw of one request, as it answers it in JSON.
#[derive(Debug, serde::Deserialize)]
struct Seen {
    method: String,
    target: String,
    headers: BTreeMap<String, Vec<String>>,
    body_bytes: usize,
}

impl Seen {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers.get(name).map(|v| v.iter().map(String::as_str).collect()).unwrap_or_default()
    }
}

/// A tiny HTTP/1.1 server on loopback standing in for the FHIR server. It
/// answers every request 200 with a JSON [`Seen`] (headers names lowercased)
/// and counts the requests that reached it.
struct Upstream {
    port: u16,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stub upstream");
        let port = listener.local_addr().expect("address").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (requests.clone(), stop.clone());
        let acceptor = thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let count = count.clone();
                    thread::spawn(move || answer(stream, &count));
                }
            }
        });
        Upstream { port, requests, stop, acceptor: Some(acceptor) }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept so that the thread sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Serves one request on one connection, then closes it.
fn answer(stream: TcpStream, count: &AtomicUsize) {
    stream.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return; // the wake-up connection of Upstream::drop
    }
    let mut words = request_line.split_whitespace();
    let (method, target) = (words.next().unwrap_or_default().to_owned(), words.next().unwrap_or_default().to_owned());
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.entry(name.trim().to_ascii_lowercase()).or_default().push(value.trim().to_owned());
        }
    }
    // nginx buffers request bodies and sends them with a Content-Length.
    let length = headers.get("content-length").and_then(|v| v[0].parse().ok()).unwrap_or(0u64);
    let body_bytes = std::io::copy(&mut reader.take(length), &mut std::io::sink()).unwrap_or(0) as usize;
    count.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::json!({"method": method, "target": target, "headers": headers, "body_bytes": body_bytes})
        .to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Powered-By: stub-fhir-server\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = (&stream).write_all(response.as_bytes());
}

// ---------------------------------------------------------------------------
// A running gateway and a client for it

/// nginx with the rendered configuration in front of the stub upstream.
/// Fields drop in order: nginx stops first, the temp dir goes last.
struct Gateway {
    nginx: Nginx,
    upstream: Upstream,
    syslog: Option<UdpSocket>,
    site: Site,
}

impl Gateway {
    fn start(limits: Limits) -> Gateway {
        Self::start_with(limits, None)
    }

    /// With a syslog copy of the access log sent to a UDP socket the test holds.
    fn start_with_syslog(limits: Limits) -> Gateway {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind syslog socket");
        socket.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
        Self::start_with(limits, Some(socket))
    }

    fn start_with(limits: Limits, syslog: Option<UdpSocket>) -> Gateway {
        let upstream = Upstream::start();
        let address = syslog.as_ref().map(|s| s.local_addr().expect("syslog address").to_string());
        let site = Site::new(limits, upstream.port, address);
        let nginx = Nginx::start(&site.conf, site.dir.path(), site.port);
        Gateway { nginx, upstream, syslog, site }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.site.port)
    }

    /// Sends `requests` in order from one curl process over one TLS 1.3
    /// connection (back to back: what rate limiting needs), verifying the
    /// test certificate.
    fn send(&self, requests: &[Req]) -> Vec<Resp> {
        const END: &str = "--end-of-response--";
        let scratch = tempfile::tempdir().expect("scratch dir");
        let mut command = Command::new(tool(&CURL));
        for (i, request) in requests.iter().enumerate() {
            if i > 0 {
                command.arg("--next");
            }
            let body_out = scratch.path().join(format!("response-{i}"));
            command.args(["-sS", "--tlsv1.3", "--cacert", self.site.cert(), "-X", request.method]);
            command.arg("-o").arg(&body_out);
            command.args(["-w", &format!("%{{http_code}}\n%{{header_json}}\n{END}\n")]);
            for header in &request.headers {
                command.args(["-H", header]);
            }
            if let Some(size) = request.body {
                let body_in = scratch.path().join(format!("request-{i}"));
                std::fs::write(&body_in, vec![b'x'; size]).expect("request body");
                command.arg("--data-binary").arg(format!("@{}", body_in.display()));
            }
            command.arg(self.url(&request.path));
        }
        let stdout = String::from_utf8(run(&mut command).stdout).expect("curl output is UTF-8");
        let chunks: Vec<&str> = stdout.split(&format!("{END}\n")).filter(|c| !c.is_empty()).collect();
        assert_eq!(chunks.len(), requests.len(), "one result per request:\n{stdout}");
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let (status, headers) = chunk.split_once('\n').expect("status line");
                let headers: BTreeMap<String, Vec<String>> =
                    serde_json::from_str(headers).unwrap_or_else(|e| panic!("curl's header JSON ({e}): {headers}"));
                Resp {
                    status: status.trim().parse().expect("status code"),
                    headers: headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect(),
                    body: std::fs::read_to_string(scratch.path().join(format!("response-{i}"))).unwrap_or_default(),
                }
            })
            .collect()
    }

    fn send_one(&self, request: Req) -> Resp {
        self.send(&[request]).pop().expect("one response")
    }

    /// The access-log line of the request with this id, once nginx wrote it
    /// (it logs after answering), checked for the documented fields.
    fn audit_line(&self, request_id: &str) -> serde_json::Map<String, Value> {
        let needle = format!("\"request_id\":\"{request_id}\"");
        let line = poll("the access-log line", || {
            self.site.access_log().lines().find(|l| l.contains(&needle)).map(String::from)
        });
        audit_fields(&line)
    }

    /// The first syslog datagram that contains `needle`.
    fn syslog_datagram(&self, needle: &str) -> String {
        let socket = self.syslog.as_ref().expect("started with a syslog socket");
        let mut buffer = [0u8; 8192];
        poll("the syslog copy", || {
            let size = socket.recv(&mut buffer).ok()?;
            let datagram = String::from_utf8_lossy(&buffer[..size]).into_owned();
            datagram.contains(needle).then_some(datagram)
        })
    }

    /// Neither a key nor patient data reached nginx's own error log.
    fn assert_error_log_keeps_secrets(&self) {
        let stderr = self.nginx.stderr();
        for secret in [ALPHA_KEY, BETA_KEY, PATIENT_NAME] {
            assert!(!stderr.contains(secret), "nginx's error log shows {secret:?}:\n{stderr}");
        }
    }
}

/// One request for [`Gateway::send`].
#[derive(Clone)]
struct Req {
    method: &'static str,
    path: String,
    headers: Vec<String>,
    /// Bytes of request body, if any.
    body: Option<usize>,
}

impl Req {
    fn new(method: &'static str, path: &str) -> Req {
        Req { method, path: path.to_owned(), headers: Vec::new(), body: None }
    }

    fn get(path: &str) -> Req {
        Self::new("GET", path)
    }

    /// A POST with a small body, as a FHIR create would be.
    fn post(path: &str) -> Req {
        Self::new("POST", path).body(16)
    }

    fn key(self, key: &str) -> Req {
        self.header(&format!("X-API-Key: {key}"))
    }

    fn header(mut self, header: &str) -> Req {
        self.headers.push(header.to_owned());
        self
    }

    fn body(mut self, bytes: usize) -> Req {
        self.body = Some(bytes);
        self
    }

    /// Sends the body chunked: no Content-Length for nginx to check first.
    fn chunked(self) -> Req {
        self.header("Transfer-Encoding: chunked")
    }
}

/// A response, with header names lowercased.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: BTreeMap<String, Vec<String>>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.first()).map(String::as_str)
    }

    fn request_id(&self) -> &str {
        self.header("x-request-id").expect("every response carries X-Request-ID")
    }

    /// What the stub upstream saw, from its echo.
    fn seen(&self) -> Seen {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not the stub's echo ({e}): {}", self.body))
    }

    /// Asserts a rejection nginx generated itself: the status, a FHIR
    /// OperationOutcome with this issue code, and the security headers.
    fn assert_outcome(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/fhir+json"), "{self:?}");
        let outcome: Value = serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("JSON body ({e}): {self:?}"));
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
        assert_eq!(outcome["issue"][0]["code"], code, "{outcome}");
        assert_security_headers(self);
    }
}

fn assert_security_headers(response: &Resp) {
    assert_eq!(response.header("strict-transport-security"), Some("max-age=31536000"), "{response:?}");
    assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "{response:?}");
    assert!(response.header("x-request-id").is_some_and(|id| id.len() == 32), "{response:?}");
    assert_eq!(response.header("server"), Some("nginx"), "no version (server_tokens off): {response:?}");
}

/// Parses one access-log line and checks it holds exactly the fields of
/// ACCESS_LOG_FIELDS, in that order, with the documented JSON types.
fn audit_fields(line: &str) -> serde_json::Map<String, Value> {
    let fields: serde_json::Map<String, Value> =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("access-log line is not a JSON object ({e}): {line}"));
    let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    let mut expected = ACCESS_LOG_FIELDS.to_vec();
    keys.sort_unstable();
    expected.sort_unstable();
    assert_eq!(keys, expected, "exactly the documented fields: {line}");
    let positions: Vec<usize> =
        ACCESS_LOG_FIELDS.iter().map(|f| line.find(&format!("\"{f}\":")).expect("field present")).collect();
    assert!(positions.is_sorted(), "fields in the documented order: {line}");
    for number in ["status", "request_time", "bytes_sent"] {
        assert!(fields[number].is_number(), "{number} is a number: {line}");
    }
    for string in ["time", "request_id", "client", "remote_addr", "method", "path", "upstream_time", "tls_protocol"] {
        assert!(fields[string].is_string(), "{string} is a string: {line}");
    }
    chrono::DateTime::parse_from_rfc3339(fields["time"].as_str().unwrap()).expect("time is ISO 8601 with offset");
    fields
}

fn statuses(responses: &[Resp]) -> Vec<u16> {
    responses.iter().map(|r| r.status).collect()
}

// ---------------------------------------------------------------------------
// nginx -t

/// The shapes of rate limit the tiers allow, each accepted by real nginx.
#[test]
fn nginx_accepts_every_shape_of_configuration() {
    let shapes = [
        ("one limit for all requests", limits(LimitKey::Client, rate(10, 20), None, None), true),
        ("reads and writes apart", limits(LimitKey::Client, rate(10, 20), Some(rate(50, 100)), Some(rate(2, 1))), true),
        // Only writes given: reads get the default. A burst of 0 is rendered as 1.
        ("per source IP", limits(LimitKey::SourceIp, rate(1, 0), None, Some(rate(100_000, 0))), false),
    ];
    for (shape, limits, with_syslog) in shapes {
        let syslog = with_syslog.then(|| "127.0.0.1:5140".to_owned());
        let site = Site::new(limits, free_port(), syslog);
        let output = site.nginx_t();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("test is successful"), "{shape}: {stderr}");
        // The same with the token verifier and a SMART configuration.
        let mut verified = site.settings.clone();
        let smart = site.dir.path().join("smart-configuration.json");
        std::fs::write(&smart, "{}").expect("smart configuration");
        verified.auth = Some(GatewayAuth {
            verifier: "127.0.0.1:9114".into(),
            base_path: "/fhir".into(),
            smart_configuration: Some(smart.display().to_string()),
        });
        let conf = nginx_conf(&verified).expect("renders with the verifier");
        assert!(
            conf.contains("auth_request /_fhir_auth;")
                && conf.contains("location = /fhir/.well-known/smart-configuration")
        );
        std::fs::write(&site.conf, conf).expect("write conf");
        hand_to_nginx(site.dir.path());
        let output = site.nginx_t();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("test is successful"), "{shape} with the verifier: {stderr}");
    }
}

// ---------------------------------------------------------------------------
// Live

#[test]
fn live_gateway_speaks_tls_1_3_only_and_no_plain_http() {
    let gateway = Gateway::start(limits(LimitKey::Client, RELAXED, None, None));
    let health = gateway.send_one(Req::get(HEALTH_PATH));
    assert_eq!((health.status, health.body.as_str()), (200, "ok"), "TLS 1.3 is served");

    let tls12 = Command::new(tool(&CURL))
        .args(["-sS", "--tlsv1.2", "--tls-max", "1.2", "--cacert", gateway.site.cert()])
        .arg(gateway.url(HEALTH_PATH))
        .output()
        .expect("run curl");
    assert_eq!(tls12.status.code(), Some(35), "TLS 1.2 handshake refused (curl: SSL connect error): {tls12:?}");
    let s_client = Command::new(tool(&OPENSSL))
        .args(["s_client", "-tls1_2", "-connect", &format!("127.0.0.1:{}", gateway.site.port)])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(!s_client.status.success(), "openssl s_client -tls1_2 fails too: {s_client:?}");

    let plain = run(Command::new(tool(&CURL))
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{}/Patient", gateway.site.port))
        .args(["-H", &format!("X-API-Key: {ALPHA_KEY}")]));
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "400", "plain HTTP on the HTTPS port is refused");
    assert_eq!(gateway.upstream.requests(), 0, "nothing reached the FHIR server");
}

#[test]
fn live_api_key_decides_who_passes_and_the_fhir_server_never_sees_a_key() {
    let gateway = Gateway::start(limits(LimitKey::Client, RELAXED, None, None));

    // Everything but the probe path needs a key, whatever the method.
    let refused = gateway.send(&[
        Req::get("/metadata"),
        Req::get("/Patient/1").key(WRONG_KEY),
        Req::get("/Patient/1").header("X-API-Key;"), // present but empty
        Req::get("/Patient/1").key(&ALPHA_KEY[..40]),
        Req::post("/Patient").header("X-Client-ID: alpha"),
        Req::get("/index.html"),
    ]);
    for response in &refused {
        response.assert_outcome(401, "login");
        assert_eq!(response.header("www-authenticate"), Some("ApiKey header=\"X-API-Key\""), "{response:?}");
    }
    let health = gateway.send_one(Req::get(HEALTH_PATH));
    assert_eq!((health.status, health.body.as_str()), (200, "ok"), "the probe needs no key");
    assert_eq!(gateway.upstream.requests(), 0, "no request without a valid key reached the FHIR server");

    // A valid key passes; what the client claims about itself does not.
    let alpha = gateway.send_one(
        Req::get(&format!("/Patient?name={PATIENT_NAME}"))
            .key(ALPHA_KEY)
            .header(&format!("X-API-Key: {BETA_KEY}"))
            .header("X-Client-ID: admin")
            .header("X-Request-ID: forged")
            .header("X-Forwarded-For: 203.0.113.7"),
    );
    assert_eq!(alpha.status, 200, "{alpha:?}");
    assert_security_headers(&alpha);
    assert_eq!(alpha.header("x-powered-by"), None, "the FHIR server's X-Powered-By is hidden");
    let seen = alpha.seen();
    assert_eq!((seen.method.as_str(), seen.target.as_str()), ("GET", format!("/Patient?name={PATIENT_NAME}").as_str()));
    assert_eq!(seen.header("x-api-key"), Vec::<&str>::new(), "every X-API-Key stripped");
    assert_eq!(seen.header("x-client-id"), ["alpha"], "the key's client id, not the client's claim");
    assert_eq!(seen.header("x-request-id"), [alpha.request_id()], "nginx's request id, the one in the log");
    assert_eq!(seen.header("x-forwarded-for"), ["127.0.0.1"], "the real peer, not the claimed chain");
    assert_eq!(seen.header("x-forwarded-proto"), ["https"]);
    assert_eq!(seen.header("host"), ["127.0.0.1"], "the client's host, not the upstream block's name");

    let beta = gateway.send_one(Req::post("/Observation").key(BETA_KEY));
    assert_eq!(beta.status, 200, "{beta:?}");
    let seen = beta.seen();
    assert_eq!((seen.method.as_str(), seen.body_bytes), ("POST", 16), "the body is proxied");
    assert_eq!(seen.header("x-client-id"), ["beta"]);
    assert_eq!(gateway.upstream.requests(), 2);
    gateway.assert_error_log_keeps_secrets();
}

#[test]
fn live_access_log_is_a_json_audit_trail_with_a_syslog_copy() {
    let gateway = Gateway::start_with_syslog(limits(LimitKey::Client, RELAXED, None, None));
    let responses = gateway.send(&[
        Req::get(&format!("/Patient?name={PATIENT_NAME}&birthdate=1970-01-01")).key(ALPHA_KEY),
        Req::get(&format!("/Patient?name={PATIENT_NAME}")).key(WRONG_KEY),
        // A path that tries to forge a log line: escaped, the line stays one JSON object.
        Req::get("/Patient/%22,%22client%22:%22admin%22%7D%0A%7B").key(BETA_KEY),
        Req::get(HEALTH_PATH),
    ]);
    assert_eq!(statuses(&responses), [200, 401, 200, 200]);

    let search = gateway.audit_line(responses[0].request_id());
    for (field, value) in [("client", "alpha"), ("method", "GET"), ("path", "/Patient"), ("tls_protocol", "TLSv1.3")] {
        assert_eq!(search[field], value, "{field}: {search:?}");
    }
    assert_eq!(search["status"], 200);
    assert_eq!(search["remote_addr"], "127.0.0.1");
    assert!(!search["upstream_time"].as_str().unwrap().is_empty(), "proxied: upstream time set");
    assert!(search["bytes_sent"].as_u64().unwrap() > 0);

    let unauthorized = gateway.audit_line(responses[1].request_id());
    assert_eq!((&unauthorized["status"], &unauthorized["client"]), (&Value::from(401), &Value::from("")));
    assert_eq!(unauthorized["path"], "/Patient");
    assert_eq!(unauthorized["upstream_time"], "", "never proxied");

    let forged = gateway.audit_line(responses[2].request_id());
    assert_eq!(forged["path"], "/Patient/\",\"client\":\"admin\"}\n{", "decoded, and escaped in the line");
    assert_eq!(forged["client"], "beta");

    // One line per request, the probe's excepted; nothing secret in any of them.
    let log = gateway.site.access_log();
    assert_eq!(log.lines().count(), 3, "{log}");
    assert!(!log.contains(HEALTH_PATH), "probes are not logged: {log}");
    for secret in [ALPHA_KEY, BETA_KEY, WRONG_KEY, PATIENT_NAME, "birthdate"] {
        assert!(!log.contains(secret), "the access log shows {secret:?}: {log}");
    }

    // The syslog copy carries the same JSON, tagged for the metrics sidecar.
    let datagram = gateway.syslog_datagram(responses[0].request_id());
    let (_, json) = datagram.split_once("fhir_gateway: ").expect("tagged fhir_gateway");
    assert_eq!(audit_fields(json.trim_end()), search, "the same line as the file's");
    gateway.assert_error_log_keeps_secrets();
}

#[test]
fn live_request_bodies_over_the_limit_get_413() {
    let mut tier = limits(LimitKey::Client, RELAXED, None, None);
    tier.max_body_bytes = 1024;
    let gateway = Gateway::start(tier);
    let search = format!("/Patient?name={PATIENT_NAME}");
    let responses = gateway.send(&[
        Req::post(&search).key(ALPHA_KEY).body(1024),
        Req::post(&search).key(ALPHA_KEY).body(1025),
        Req::new("PUT", &search).key(ALPHA_KEY).body(64 * 1024),
    ]);
    assert_eq!(responses[0].status, 200, "exactly the limit passes: {:?}", responses[0]);
    assert_eq!(responses[0].seen().body_bytes, 1024);
    for response in &responses[1..] {
        response.assert_outcome(413, "too-long");
    }
    // Chunked: nginx only learns the size while reading the body. Its own
    // curl process, since nginx closes the connection after a 413.
    gateway.send_one(Req::post(&search).key(ALPHA_KEY).body(4096).chunked()).assert_outcome(413, "too-long");
    assert_eq!(gateway.upstream.requests(), 1, "no oversized body reached the FHIR server");
    let rejected = gateway.audit_line(responses[1].request_id());
    assert_eq!((&rejected["status"], &rejected["client"]), (&Value::from(413), &Value::from("alpha")));
    gateway.assert_error_log_keeps_secrets();
}

/// Reads and writes have their own budgets, per client: at 1 r/s with a
/// burst of 1, two back-to-back requests pass and the third is refused
/// unless a whole second went by (the requests here take milliseconds).
#[test]
fn live_rate_limits_each_client_with_reads_apart_from_writes() {
    let slow = rate(1, 1);
    let gateway = Gateway::start(limits(LimitKey::Client, RELAXED, Some(slow), Some(slow)));
    let search = format!("/Patient?name={PATIENT_NAME}");
    let mut sequence = vec![Req::post(&search).key(ALPHA_KEY); 5];
    sequence.push(Req::get(&search).key(ALPHA_KEY)); // alpha's reads: a budget of their own
    sequence.push(Req::post(&search).key(BETA_KEY)); // beta: a budget of its own
    sequence.extend(vec![Req::new("DELETE", "/Patient/1").key(ALPHA_KEY); 2]);
    sequence.extend(vec![Req::get(&search).key(ALPHA_KEY); 4]);
    let responses = gateway.send(&sequence);
    let codes = statuses(&responses);

    let (writes, rest) = codes.split_at(5);
    assert_eq!(writes[..2], [200, 200], "rate plus burst pass: {codes:?}");
    assert!(writes[2..].contains(&429), "then alpha's writes are refused: {codes:?}");
    assert_eq!(rest[..2], [200, 200], "alpha still reads, beta still writes: {codes:?}");
    assert_eq!(rest[2..4], [429, 429], "DELETE counts as a write: {codes:?}");
    assert_eq!(rest[4], 200, "alpha's second read is within its burst: {codes:?}");
    assert!(rest[5..].contains(&429), "then alpha's reads are refused too: {codes:?}");
    assert!(codes.iter().all(|c| [200, 429].contains(c)), "{codes:?}");

    for response in responses.iter().filter(|r| r.status == 429) {
        response.assert_outcome(429, "throttled");
        assert_eq!(response.header("retry-after"), Some("1"), "{response:?}");
    }
    let passed = codes.iter().filter(|&&c| c == 200).count();
    assert_eq!(gateway.upstream.requests(), passed, "refused requests never reached the FHIR server");
    let refused = responses.iter().find(|r| r.status == 429).unwrap();
    let line = gateway.audit_line(refused.request_id());
    assert_eq!((&line["status"], &line["client"]), (&Value::from(429), &Value::from("alpha")));
    gateway.assert_error_log_keeps_secrets();
}

/// Keyed by source address, clients behind one address share one budget.
#[test]
fn live_source_ip_limit_is_shared_by_every_client_behind_an_address() {
    let gateway = Gateway::start(limits(LimitKey::SourceIp, rate(1, 1), None, None));
    let mut sequence = vec![Req::get("/Patient").key(ALPHA_KEY); 3];
    sequence.push(Req::post("/Patient").key(BETA_KEY));
    let codes = statuses(&gateway.send(&sequence));
    assert_eq!(codes[..2], [200, 200], "rate plus burst pass: {codes:?}");
    assert_eq!(codes[3], 429, "beta shares alpha's exhausted address budget, writes included: {codes:?}");
}

/// In a pod, each KeyRotationSchedule's Secret is its own directory and the
/// gateway includes `keys/*/api-keys.map`: with no schedule mounted yet the
/// glob matches nothing and nginx still starts (refusing everyone); with two,
/// both schedules' clients pass.
#[test]
fn a_glob_key_map_takes_every_schedules_keys_and_tolerates_none() {
    let upstream = Upstream::start();
    let mut site = Site::new(limits(LimitKey::Client, RELAXED, None, None), upstream.port, None);
    let keys = site.dir.path().join("keys");
    std::fs::create_dir(&keys).expect("keys dir");
    site.settings.api_keys_map = format!("{}/*/api-keys.map", keys.display());
    std::fs::write(&site.conf, nginx_conf(&site.settings).expect("a glob key map renders")).expect("write conf");
    hand_to_nginx(site.dir.path());
    let output = site.nginx_t();
    assert!(String::from_utf8_lossy(&output.stderr).contains("test is successful"), "no schedule yet: {output:?}");

    for (schedule, key, client) in [("portal-keys", ALPHA_KEY, "alpha"), ("billing-keys", BETA_KEY, "beta")] {
        std::fs::create_dir(keys.join(schedule)).expect("schedule dir");
        let map = api_keys_map(&[pair(key, client)]).expect("key map");
        std::fs::write(keys.join(schedule).join("api-keys.map"), map).expect("write key map");
    }
    hand_to_nginx(site.dir.path());
    let nginx = Nginx::start(&site.conf, site.dir.path(), site.port);
    let gateway = Gateway { nginx, upstream, syslog: None, site };
    let responses = gateway.send(&[
        Req::get("/Patient/1").key(ALPHA_KEY),
        Req::get("/Patient/1").key(BETA_KEY),
        Req::get("/Patient/1").key(WRONG_KEY),
    ]);
    assert_eq!(statuses(&responses), [200, 200, 401], "both schedules' keys pass, others do not");
}

#[test]
fn live_forwarded_headers_are_the_gateways_never_the_clients() {
    let gateway = Gateway::start(limits(LimitKey::Client, RELAXED, None, None));
    let response = gateway.send_one(
        Req::get("/fhir/Patient")
            .key(ALPHA_KEY)
            .header("X-Forwarded-Host: evil.example")
            .header("X-Forwarded-Proto: http")
            .header("X-Forwarded-Port: 80")
            .header("X-Forwarded-Prefix: /evil")
            .header("X-Forwarded-Server: evil.example")
            .header("X-Real-IP: 203.0.113.9")
            .header("Forwarded: for=203.0.113.9;host=evil.example;proto=http"),
    );
    assert_eq!(response.status, 200, "{response:?}");
    let seen = response.seen();
    // The endpoint's public address (the settings' public_host and port),
    // the same the FHIR server is configured with.
    assert_eq!(seen.header("x-forwarded-host"), ["patients.clinical.svc"], "not the client's claim");
    assert_eq!(seen.header("x-forwarded-proto"), ["https"]);
    assert_eq!(seen.header("x-forwarded-port"), ["443"]);
    assert_eq!(seen.header("x-forwarded-for"), ["127.0.0.1"]);
    for dropped in ["forwarded", "x-forwarded-prefix", "x-forwarded-server", "x-real-ip"] {
        assert_eq!(seen.header(dropped), Vec::<&str>::new(), "{dropped} is not passed on");
    }
}
