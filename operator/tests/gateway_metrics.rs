//! The real sidecar (`fhir-operator gateway-metrics`, the built binary) on
//! loopback: fed syslog datagrams in nginx's format, by hand and by a real
//! nginx (Debian package `nginx`), scraped over HTTP by these tests and by
//! a real Prometheus (Debian package `prometheus`) that evaluates the
//! generated alert rules. Every child process is killed by a guard, even
//! when an assertion fails.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fhir_operator::fhirendpoint::gateway::ACCESS_LOG_FIELDS;
use fhir_operator::fhirendpoint::monitoring::{AlertSettings, prometheus_rule_spec, rule_groups_yaml};
use fhir_operator::gateway_metrics::{
    CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, LOG_PARSE_ERRORS_TOTAL, REJECTIONS_TOTAL, REQUEST_DURATION_SECONDS,
    REQUESTS_TOTAL,
};

/// Polls are bounded: this many tries, `POLL` apart (10 s in all).
const TRIES: u32 = 200;
const POLL: Duration = Duration::from_millis(50);

/// Kills and reaps the process when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago for both TCP and UDP (the
/// sidecar's syslog port is UDP); callers retry on a race.
fn free_port() -> u16 {
    for _ in 0..10 {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
        let port = tcp.local_addr().expect("local address").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port free for both TCP and UDP");
}

/// Starts `what` (`command` given a free loopback address) and waits,
/// bounded, until `ready`; on another port if the first was taken.
fn start_on_free_port(
    what: &str,
    mut command: impl FnMut(SocketAddr) -> Command,
    ready: impl Fn(SocketAddr) -> bool,
) -> (Process, SocketAddr) {
    for _ in 0..5 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = command(addr).stdin(Stdio::null()).spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {what} ({e}); nginx and prometheus come from the Debian packages `nginx` and `prometheus`"
            )
        });
        let mut process = Process(child);
        for _ in 0..TRIES {
            if ready(addr) {
                return (process, addr);
            }
            if process.0.try_wait().ok().flatten().is_some() {
                break; // the port was taken after all: try another
            }
            std::thread::sleep(POLL);
        }
    }
    panic!("{what} did not become ready on loopback");
}

/// Sends an HTTP request and returns the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // HTTP/1.0: every server here then ends the body by closing, never by chunks.
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).ok()?;
    // nginx may answer (413) before reading the body and close: ignore.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

struct Sidecar {
    syslog: SocketAddr,
    /// Where the test's datagrams come from, as nginx's come from its own.
    sender: UdpSocket,
    metrics: SocketAddr,
    _process: Process,
}

impl Sidecar {
    /// Starts the sidecar on free loopback ports; ready when `/healthz`
    /// answers (both sockets are bound by then).
    fn start(extra_args: &[&str]) -> Sidecar {
        let syslog = std::cell::Cell::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        let (process, metrics) = start_on_free_port(
            "gateway-metrics",
            |metrics| {
                syslog.set(SocketAddr::from(([127, 0, 0, 1], free_port())));
                let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-operator"));
                command
                    .arg("gateway-metrics")
                    .args(["--syslog-listen", &syslog.get().to_string(), "--metrics-listen", &metrics.to_string()])
                    .args(extra_args);
                command
            },
            |metrics| matches!(http(metrics, "GET", "/healthz", &[], b""), Some((200, _))),
        );
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
        Sidecar { syslog: syslog.get(), sender, metrics, _process: process }
    }

    fn send(&self, datagram: &[u8]) {
        self.sender.send_to(datagram, self.syslog).expect("send a datagram");
    }

    fn scrape(&self) -> Vec<Sample> {
        let (status, body) = http(self.metrics, "GET", "/metrics", &[], b"").expect("scrape /metrics");
        assert_eq!(status, 200, "{body}");
        assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF:\n{body}");
        parse_exposition(&body)
    }

    /// Scrapes until `requests` access-log lines and `errors` bad
    /// datagrams have been counted (UDP delivery is asynchronous).
    fn scrape_after(&self, requests: f64, errors: f64) -> Vec<Sample> {
        let mut counted = (0.0, 0.0);
        for _ in 0..TRIES {
            let samples = self.scrape();
            counted = (
                total(&samples, &format!("{REQUEST_DURATION_SECONDS}_count")),
                total(&samples, LOG_PARSE_ERRORS_TOTAL),
            );
            if counted.0 >= requests && counted.1 >= errors {
                return samples;
            }
            std::thread::sleep(POLL);
        }
        panic!("the sidecar counted {} of {requests} requests and {} of {errors} bad datagrams", counted.0, counted.1);
    }
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the samples of a text exposition (comments skipped).
fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let name_end = line.find(['{', ' ']).expect("a sample line has a name");
            let (name, mut rest) = line.split_at(name_end);
            let mut labels = BTreeMap::new();
            if let Some(inner) = rest.strip_prefix('{') {
                let mut chars = inner.char_indices();
                let mut key = String::new();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '}' => break,
                        ',' => {}
                        '=' => {
                            chars.next(); // opening quote
                            let mut value = String::new();
                            while let Some((_, c)) = chars.next() {
                                match c {
                                    '"' => break,
                                    '\\' => value.push(match chars.next().map(|(_, c)| c) {
                                        Some('n') => '\n',
                                        Some(other) => other,
                                        None => break,
                                    }),
                                    c => value.push(c),
                                }
                            }
                            labels.insert(std::mem::take(&mut key), value);
                        }
                        c => key.push(c),
                    }
                }
                rest = chars.next().map_or("", |(i, _)| &inner[i..]);
            }
            let value = rest.trim().parse().unwrap_or_else(|e| panic!("sample value in {line:?}: {e}"));
            Sample { name: name.to_owned(), labels, value }
        })
        .collect()
}

/// The value of the sample with exactly these labels.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples.iter().find(|s| s.name == name && s.labels == wanted).map(|s| s.value)
}

/// `fhir_gateway_requests_total` of one client, method class and status class.
fn requests(samples: &[Sample], client: &str, method_class: &str, status_class: &str) -> Option<f64> {
    let labels = [("client", client), ("method_class", method_class), ("status_class", status_class)];
    value(samples, REQUESTS_TOTAL, &labels)
}

/// `fhir_gateway_rejections_total` of one client and reason.
fn rejections(samples: &[Sample], client: &str, reason: &str) -> Option<f64> {
    value(samples, REJECTIONS_TOTAL, &[("client", client), ("reason", reason)])
}

/// Sum over every series of `name`.
fn total(samples: &[Sample], name: &str) -> f64 {
    samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
}

/// One access-log line as the gateway's log_format writes it: the fields
/// of the contract, in its order, numbers unquoted.
fn access_log_json(client: &str, method: &str, status: u16, request_time: &str) -> String {
    let fields: Vec<String> = ACCESS_LOG_FIELDS
        .iter()
        .map(|field| {
            let value = match *field {
                "time" => "\"2025-03-07T09:05:01+00:00\"".to_owned(),
                "request_id" => "\"0c3f6b1e8a2d4c7b9e5f1a3d6c8b0e2f\"".to_owned(),
                "client" => format!("\"{client}\""),
                "remote_addr" => "\"10.1.2.3\"".to_owned(),
                "method" => format!("\"{method}\""),
                "path" => "\"/fhir/Patient/123\"".to_owned(),
                "status" => status.to_string(),
                "request_time" => request_time.to_owned(),
                "upstream_time" => "\"0.004\"".to_owned(),
                "bytes_sent" => "512".to_owned(),
                "tls_protocol" => "\"TLSv1.3\"".to_owned(),
                "subject" | "jti" => "\"\"".to_owned(),
                other => panic!("the access-log contract has a new field {other}: teach this test its value"),
            };
            format!("\"{field}\":{value}")
        })
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// nginx's syslog framing: `<PRI>Mmm dd hh:mm:ss hostname tag: message`
/// (PRI 190 = facility local7, severity info; days padded with a space).
fn nginx_syslog(message: &str) -> String {
    format!("<190>Mar  7 09:05:01 fhir-5d8c-a fhir_gateway: {message}")
}

#[test]
fn sidecar_counts_nginx_syslog_lines_and_survives_malformed_ones() {
    let sidecar = Sidecar::start(&[]);
    let lines = [
        ("billing", "GET", 200, "0.012"),
        ("billing", "GET", 200, "0.300"),
        ("billing", "HEAD", 304, "0.001"),
        ("billing", "POST", 201, "1.200"),
        ("", "GET", 401, "0.000"),
        ("billing", "POST", 429, "0.000"),
        ("lab", "PUT", 413, "0.001"),
        ("lab", "DELETE", 503, "2.500"),
    ];
    let malformed: [&[u8]; 4] = [
        b"garbage",
        b"<190>Mar  7 09:05:01 fhir-5d8c-a fhir_gateway: {\"client\":\"billing\",\"method\":\"GET\",\"sta",
        b"<190>Mar  7 09:05:01 fhir-5d8c-a sshd: {\"client\":\"\",\"method\":\"GET\",\"status\":200,\"request_time\":0}",
        b"\xff\xfe\xfd",
    ];
    for (i, (client, method, status, seconds)) in lines.iter().enumerate() {
        sidecar.send(nginx_syslog(&access_log_json(client, method, *status, seconds)).as_bytes());
        // The malformed ones in between: they must not stop what follows.
        if let Some(bad) = malformed.get(i) {
            sidecar.send(bad);
        }
    }
    let samples = sidecar.scrape_after(lines.len() as f64, malformed.len() as f64);
    assert_eq!(requests(&samples, "billing", "read", "2xx"), Some(2.0), "{samples:#?}");
    assert_eq!(requests(&samples, "billing", "read", "3xx"), Some(1.0));
    assert_eq!(requests(&samples, "billing", "write", "2xx"), Some(1.0));
    assert_eq!(requests(&samples, "", "read", "4xx"), Some(1.0));
    assert_eq!(requests(&samples, "billing", "write", "4xx"), Some(1.0));
    assert_eq!(requests(&samples, "lab", "write", "4xx"), Some(1.0));
    assert_eq!(requests(&samples, "lab", "write", "5xx"), Some(1.0));
    assert_eq!(total(&samples, REQUESTS_TOTAL), 8.0);
    assert_eq!(rejections(&samples, "", "unauthorized"), Some(1.0));
    assert_eq!(rejections(&samples, "billing", "rate_limited"), Some(1.0));
    assert_eq!(rejections(&samples, "lab", "body_too_large"), Some(1.0));
    assert_eq!(total(&samples, REJECTIONS_TOTAL), 3.0);
    let bucket = |class, le| {
        value(&samples, &format!("{REQUEST_DURATION_SECONDS}_bucket"), &[("method_class", class), ("le", le)])
    };
    let count = |class| value(&samples, &format!("{REQUEST_DURATION_SECONDS}_count"), &[("method_class", class)]);
    assert_eq!((count("read"), count("write")), (Some(4.0), Some(4.0)));
    // read: 0.012, 0.3, 0.001, 0.0; write: 1.2, 0.0, 0.001, 2.5.
    assert_eq!(bucket("read", "0.01"), Some(2.0));
    assert_eq!(bucket("read", "0.3"), Some(4.0));
    assert_eq!(bucket("write", "1.0"), Some(2.0));
    assert_eq!(bucket("write", "2.0"), Some(3.0));
    assert_eq!(bucket("write", "3.0"), Some(4.0));
    assert_eq!(bucket("write", "+Inf"), Some(4.0));
    let sum = value(&samples, &format!("{REQUEST_DURATION_SECONDS}_sum"), &[("method_class", "write")]);
    assert!(sum.is_some_and(|s| (s - 3.701).abs() < 1e-9), "{sum:?}");
    assert_eq!(value(&samples, LOG_PARSE_ERRORS_TOTAL, &[]), Some(4.0));
    assert_eq!(http(sidecar.metrics, "GET", "/healthz", &[], b"").map(|(s, _)| s), Some(200), "still healthy");
}

/// A `fhir_gateway_*` selector of an alert expression.
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String)>,
    /// Labels the expression aggregates `by`.
    by: Vec<String>,
}

/// Every `fhir_gateway_*` selector of the alert expressions.
fn selectors_of_the_alerts() -> Vec<Selector> {
    let spec = prometheus_rule_spec(&AlertSettings::new("ns", "ep"));
    let mut found = Vec::new();
    for rule in &spec.groups[0].rules {
        let expr = &rule.expr;
        let by: Vec<String> = expr
            .match_indices("by (")
            .flat_map(|(i, m)| {
                let list = &expr[i + m.len()..];
                list[..list.find(')').unwrap_or(0)].split(',').map(|l| l.trim().to_owned()).collect::<Vec<_>>()
            })
            .collect();
        for (start, _) in expr.match_indices("fhir_gateway_") {
            let rest = &expr[start..];
            let name_end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            let matchers = rest[name_end..]
                .strip_prefix('{')
                .and_then(|m| m.split_once('}'))
                .map(|(inner, _)| {
                    inner
                        .split(',')
                        .filter_map(|pair| pair.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            found.push(Selector { name: rest[..name_end].to_owned(), matchers, by: by.clone() });
        }
    }
    found
}

/// Writes `dir/tls.crt`, a self-signed certificate whose notAfter is
/// midnight UTC of `not_after`.
fn write_certificate(dir: &Path, not_after: chrono::NaiveDate) -> PathBuf {
    use chrono::Datelike;
    let mut params = rcgen::CertificateParams::new(vec!["fhir.clinic.svc".to_owned()]).expect("params");
    let month = u8::try_from(not_after.month()).expect("a month");
    let day = u8::try_from(not_after.day()).expect("a day");
    params.not_after = rcgen::date_time_ymd(not_after.year(), month, day);
    let key = rcgen::KeyPair::generate().expect("key");
    let path = dir.join("tls.crt");
    std::fs::write(&path, params.self_signed(&key).expect("certificate").pem()).expect("write tls.crt");
    path
}

#[test]
fn alert_rules_use_only_names_and_labels_the_sidecar_exports() {
    let dir = tempfile::tempdir().expect("temp dir");
    let expiry = chrono::NaiveDate::from_ymd_opt(2031, 1, 2).expect("a date");
    let certificate = write_certificate(dir.path(), expiry);

    let sidecar = Sidecar::start(&["--tls-certificate", certificate.to_str().expect("UTF-8 path")]);
    // Before any request: the certificate's expiry, 2031-01-02T00:00:00Z.
    let idle = sidecar.scrape();
    assert_eq!(value(&idle, CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, &[]), Some(1_925_078_400.0), "{idle:#?}");

    // One request of each kind the alerts look at.
    for (client, method, status) in [
        ("billing", "GET", 200),
        ("billing", "POST", 500),
        ("", "GET", 401),
        ("billing", "GET", 403),
        ("lab", "GET", 429),
    ] {
        sidecar.send(nginx_syslog(&access_log_json(client, method, status, "0.042")).as_bytes());
    }
    let samples = sidecar.scrape_after(4.0, 0.0);

    // Prometheus adds these from the ServiceMonitor; the sidecar does not.
    let target_labels: BTreeSet<&str> = ["namespace", "service", "endpoint"].into();
    let selectors = selectors_of_the_alerts();
    let names: BTreeSet<&str> = selectors.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    for Selector { name, matchers, by } in &selectors {
        let matching: Vec<&Sample> = samples
            .iter()
            .filter(|s| &s.name == name)
            .filter(|s| {
                matchers.iter().filter(|(k, _)| !target_labels.contains(k.as_str())).all(|(k, v)| {
                    match v.strip_prefix('~') {
                        // A regular expression of alternatives: reason=~"a|b".
                        Some(alternatives) => alternatives
                            .trim_matches('"')
                            .split('|')
                            .any(|a| s.labels.get(k).map(String::as_str) == Some(a)),
                        None => s.labels.get(k) == Some(v),
                    }
                })
            })
            .collect();
        assert!(!matching.is_empty(), "no sample {name} {matchers:?} in the scrape:\n{samples:#?}");
        for label in by.iter().filter(|l| !target_labels.contains(l.as_str())) {
            assert!(matching.iter().all(|s| s.labels.contains_key(label)), "{name} has no label {label}");
        }
    }
}

/// nginx's variable for each contract field, and whether the value is a
/// JSON string (quoted) or a number.
fn nginx_variable(field: &str) -> (&'static str, bool) {
    match field {
        "time" => ("$time_iso8601", true),
        "request_id" => ("$request_id", true),
        "client" => ("$client_id", true),
        "remote_addr" => ("$remote_addr", true),
        "method" => ("$request_method", true),
        "path" => ("$uri", true),
        "status" => ("$status", false),
        "request_time" => ("$request_time", false),
        "upstream_time" => ("$upstream_response_time", true),
        "bytes_sent" => ("$body_bytes_sent", false),
        "tls_protocol" => ("$ssl_protocol", true),
        // Set by the token verifier; empty with API keys alone.
        "subject" | "jti" => ("", true),
        other => panic!("the access-log contract has a new field {other}: teach this test its variable"),
    }
}

/// A minimal nginx with the gateway's logging contract: API keys mapped to
/// client ids (401 without one), a per-client rate limit (429), a body
/// limit (413), the JSON log to a file (the audit trail) and to syslog.
fn nginx_conf(dir: &Path, listen: u16, syslog: SocketAddr) -> String {
    let json: Vec<String> = ACCESS_LOG_FIELDS
        .iter()
        .map(|field| match nginx_variable(field) {
            (variable, true) => format!("\"{field}\":\"{variable}\""),
            (variable, false) => format!("\"{field}\":{variable}"),
        })
        .collect();
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_x_api_key $client_id {{
        default "";
        "key-billing" billing;
        "key-lab" lab;
    }}
    limit_req_zone $client_id zone=per_client:1m rate=1r/m;
    limit_req_status 429;
    client_max_body_size 1k;
    log_format fhir_json escape=json '{{{json}}}';
    access_log {d}/access.log fhir_json;
    access_log syslog:server={syslog},tag=fhir_gateway fhir_json;
    server {{
        listen 127.0.0.1:{listen};
        if ($client_id = "") {{ return 401; }}
        location / {{ return 200 "ok\n"; }}
        # A static file: `return` would answer before limit_req is applied.
        location = /limited {{ root {d}/www; limit_req zone=per_client nodelay; }}
        location /broken {{ return 503; }}
    }}
}}
"#,
        json = json.join(",")
    )
}

/// Runs nginx on a free loopback port until the guard is dropped.
fn start_nginx(dir: &Path, syslog: SocketAddr) -> (Process, SocketAddr) {
    std::fs::create_dir_all(dir.join("www")).expect("create www");
    std::fs::write(dir.join("www/limited"), "ok\n").expect("write www/limited");
    let conf = dir.join("nginx.conf");
    start_on_free_port(
        "nginx",
        |addr| {
            std::fs::write(&conf, nginx_conf(dir, addr.port(), syslog)).expect("write nginx.conf");
            let mut command = Command::new("nginx");
            command.arg("-p").arg(dir).arg("-e").arg(dir.join("error.log")).arg("-c").arg(&conf);
            command
        },
        |addr| TcpStream::connect_timeout(&addr, POLL).is_ok(),
    )
}

#[test]
fn real_nginx_feeds_the_real_sidecar() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = Sidecar::start(&[]);
    let (_nginx, addr) = start_nginx(dir.path(), sidecar.syslog);
    let (billing, lab) = (Some("key-billing"), Some("key-lab"));
    let long_path = format!("/fhir/Patient/{}", "p".repeat(3000));
    let too_long_path = format!("/{}", "x".repeat(9000));
    // (method, path, API key, body bytes, expected status)
    let exchanges = [
        ("GET", "/fhir/Patient", billing, 0, 200),
        ("GET", &long_path, billing, 0, 200),
        ("GET", "/fhir/Patient", None, 0, 401),
        ("GET", "/fhir/Patient", Some("guessed"), 0, 401),
        ("POST", "/fhir/Patient", lab, 2048, 413),
        ("GET", "/limited", billing, 0, 200),
        ("GET", "/limited", billing, 0, 429),
        ("GET", "/limited", billing, 0, 429),
        ("DELETE", "/broken", lab, 0, 503),
        // Beyond nginx's header buffers: 414, logged with no method and no client.
        ("GET", &too_long_path, billing, 0, 414),
    ];
    for (method, path, key, body_bytes, expected) in exchanges {
        let headers: Vec<(&str, &str)> = key.map(|k| ("X-API-Key", k)).into_iter().collect();
        let status = http(addr, method, path, &headers, &vec![b'{'; body_bytes]).map(|(s, _)| s);
        assert_eq!(status, Some(expected), "{method} {:.40}", path);
    }
    let samples = sidecar.scrape_after(exchanges.len() as f64, 0.0);
    assert_eq!(requests(&samples, "billing", "read", "2xx"), Some(3.0), "{samples:#?}");
    assert_eq!(requests(&samples, "", "read", "4xx"), Some(2.0));
    assert_eq!(requests(&samples, "lab", "write", "4xx"), Some(1.0));
    assert_eq!(requests(&samples, "billing", "read", "4xx"), Some(2.0));
    assert_eq!(requests(&samples, "lab", "write", "5xx"), Some(1.0));
    // The 414: nginx gave up before reading the method or the API key.
    assert_eq!(requests(&samples, "", "other", "4xx"), Some(1.0));
    assert_eq!(rejections(&samples, "", "unauthorized"), Some(2.0));
    assert_eq!(rejections(&samples, "lab", "body_too_large"), Some(1.0));
    assert_eq!(rejections(&samples, "billing", "rate_limited"), Some(2.0));
    assert_eq!(value(&samples, LOG_PARSE_ERRORS_TOTAL, &[]), Some(0.0));
    // The syslog copy counted exactly the lines of the audit log.
    let audit = std::fs::read_to_string(dir.path().join("access.log")).expect("nginx wrote its access log");
    assert_eq!(audit.lines().count(), exchanges.len());
    assert_eq!(total(&samples, REQUESTS_TOTAL), exchanges.len() as f64);
}

/// Percent-encodes a query parameter.
fn query_parameter(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus (Debian package `prometheus`) scraping `target` every
/// second with the labels the ServiceMonitor gives it, and evaluating the
/// rules of `settings` every second.
fn start_prometheus(dir: &Path, settings: &AlertSettings, target: SocketAddr) -> (Process, SocketAddr) {
    std::fs::write(dir.join("rules.yaml"), rule_groups_yaml(&prometheus_rule_spec(settings))).expect("write rules");
    let config = serde_json::json!({
        "global": { "scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s" },
        "rule_files": ["rules.yaml"],
        "scrape_configs": [{
            "job_name": settings.endpoint,
            "static_configs": [{
                "targets": [target.to_string()],
                "labels": {
                    "namespace": settings.namespace,
                    "service": settings.endpoint,
                    "endpoint": "metrics",
                    "pod": format!("{}-0", settings.endpoint),
                },
            }],
        }],
    });
    let config_file = dir.join("prometheus.yml");
    std::fs::write(&config_file, serde_yaml::to_string(&config).expect("config as YAML")).expect("write config");
    start_on_free_port(
        "prometheus",
        |addr| {
            let mut command = Command::new("prometheus");
            command
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn");
            command
        },
        |addr| matches!(http(addr, "GET", "/-/ready", &[], b""), Some((200, _))),
    )
}

/// `GET /api/v1/...` of Prometheus, as JSON.
fn prometheus_api(prometheus: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http(prometheus, "GET", &format!("/api/v1/{path}"), &[], b"").expect("Prometheus answers");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("Prometheus answers JSON")
}

/// Names of the alerts Prometheus holds (pending or firing).
fn active_alerts(prometheus: SocketAddr) -> BTreeSet<String> {
    let alerts = prometheus_api(prometheus, "alerts");
    alerts["data"]["alerts"]
        .as_array()
        .expect("data.alerts")
        .iter()
        .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
        .collect()
}

/// Polls until `done` holds for the active alerts; returns the last ones.
fn alerts_until(prometheus: SocketAddr, done: impl Fn(&BTreeSet<String>) -> bool) -> BTreeSet<String> {
    let mut alerts = BTreeSet::new();
    for _ in 0..TRIES {
        alerts = active_alerts(prometheus);
        if done(&alerts) {
            break;
        }
        std::thread::sleep(POLL);
    }
    alerts
}

#[test]
fn real_prometheus_scrapes_the_sidecar_and_raises_the_alerts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let expiry = chrono::Utc::now().date_naive() + chrono::Days::new(3);
    let certificate = write_certificate(dir.path(), expiry);
    let sidecar = Sidecar::start(&["--tls-certificate", certificate.to_str().expect("UTF-8 path")]);
    let settings = AlertSettings::new("clinic", "fhir");
    let mut counted = 0.0;
    // Per lot: 10 fine, 10 failing with 503 after 2.5 s (7% of all, and
    // p99 in the slow bucket), 60 rate limited, 60 without a valid key.
    // rate() divides by its whole 5 minute window, so above 1/s takes more
    // than 300 of each in a few seconds. Sent a lot at a time, each counted
    // before the next: the kernel drops what overflows the socket buffer.
    let mut send_traffic = || {
        let lot = [
            ("billing", "GET", 200, "0.010", 10),
            ("billing", "PUT", 503, "2.500", 10),
            ("lab", "GET", 429, "0.000", 60),
            ("", "GET", 401, "0.000", 60),
        ];
        for _ in 0..10 {
            for (client, method, status, seconds, times) in lot {
                let datagram = nginx_syslog(&access_log_json(client, method, status, seconds));
                for _ in 0..times {
                    sidecar.send(datagram.as_bytes());
                }
            }
            counted += 140.0;
            sidecar.scrape_after(counted, 0.0);
        }
    };
    // Counters must exist before Prometheus's first scrape: rate() sees
    // only increases between scrapes.
    send_traffic();
    let (_prometheus, prometheus) = start_prometheus(dir.path(), &settings, sidecar.metrics);
    let up = format!("query?query={}", query_parameter(r#"up{namespace="clinic",service="fhir"}"#));
    let mut scraped = false;
    for _ in 0..TRIES {
        scraped = prometheus_api(prometheus, &up)["data"]["result"][0]["value"][1] == "1";
        if scraped {
            break;
        }
        std::thread::sleep(POLL);
    }
    assert!(scraped, "Prometheus scraped the sidecar's OpenMetrics text (up == 1)");
    send_traffic();

    // Pending is enough: the `for` durations are minutes.
    let raised = [
        "FhirEndpointHighErrorRatio",
        "FhirEndpointHighLatencyP99",
        "FhirEndpointRateLimitSpike",
        "FhirEndpointUnauthorizedSpike",
        "FhirEndpointCertificateExpiringSoon",
    ];
    let alerts = alerts_until(prometheus, |alerts| raised.iter().all(|a| alerts.contains(*a)));
    assert!(raised.iter().all(|a| alerts.contains(*a)), "{alerts:?}");
    assert!(!alerts.contains("FhirEndpointDown"), "{alerts:?}");

    drop(sidecar);
    let alerts = alerts_until(prometheus, |alerts| alerts.contains("FhirEndpointDown"));
    assert!(alerts.contains("FhirEndpointDown"), "the sidecar is gone: {alerts:?}");
}
