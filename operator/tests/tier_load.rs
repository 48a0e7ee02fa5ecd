//! The example RateLimitTiers (`examples/ratelimittier-*.yaml`, the tiers
//! users copy) against a real nginx (Debian package `nginx`) on loopback:
//! - each tier's rendered configuration passes `nginx -t`;
//! - under a bounded load well above the tier's limits, from two clients at
//!   once, the gateway admits each client the configured rate plus burst
//!   within ±15%, with reads and writes limited apart where the tier splits
//!   them; a 429 carries Retry-After;
//! - a body of exactly the tier's `maxRequestBodySize` passes, one byte more
//!   gets 413.
//!
//! The load comes from this file, over `openssl s_client` (Debian package
//! `openssl`) as the TLS transport: one long-lived process per keep-alive
//! TLS 1.3 connection, verifying the operator-issued certificate. The test
//! writes each HTTP/1.1 request into it at the instant its schedule says and
//! parses every response that comes back. Why that and not another tool:
//! - no TLS crate is a direct dependency of the operator (rustls only comes
//!   in through kube), so Rust code cannot speak TLS here by itself;
//! - a curl process per request cannot reach hundreds per second, and one
//!   curl process per stream neither says when it sent each request nor
//!   lets the test count statuses as they arrive;
//! - wrk is a closed loop (it sends as fast as answers come, which takes the
//!   machine's two cores rather than a chosen rate) and reports statuses
//!   only through Lua hooks, and it is one more package to install.
//!
//! Pacing the requests in-process gives an open-loop load at a chosen rate,
//! the exact window it was offered over, and full responses (Retry-After).
//! Measured rates are printed; run with `--no-capture` to see them.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fhir_operator::api::RateLimitTier;
use fhir_operator::fhirendpoint::build::limits_from_tier;
use fhir_operator::fhirendpoint::gateway::{
    GatewaySettings, HEALTH_PATH, LimitKey, Limits, Rate, api_keys_map, nginx_conf,
};
use fhir_operator::fhirendpoint::tls;
use support::*;

/// How long one load phase offers requests.
const WINDOW: Duration = Duration::from_secs(4);
/// How far a measured admitted rate may be from the configured one.
const TOLERANCE: f64 = 0.15;
/// Offered load, as a multiple of the limit it is aimed at...
const OVERLOAD: u32 = 4;
/// ...but at least this many requests per second per stream: with a burst
/// of 0 nginx admits a request only once a whole 1/rate has passed since the
/// last one admitted and keeps no credit for the time beyond, so each
/// admission waits for the next arrival and the admitted rate falls short by
/// up to one arrival spacing per period (measured on bronze, 10/s: offered
/// at 43/s it admits 8.8/s, at 15/s 7.6/s). At 100/s that is at most 10 ms
/// in 100 ms...
const MIN_OFFERED_PER_SECOND: u32 = 100;
/// ...and at most this many, so that two shared cores keep up with nginx,
/// the stub and the load at once.
const MAX_OFFERED_PER_SECOND: u32 = 300;
/// Requests per connection at most: nginx closes a keep-alive connection
/// after 1000 (`keepalive_requests`), so a stream that sends more spreads
/// them over several connections.
const MAX_REQUESTS_PER_CONNECTION: usize = 500;

/// A client of the gateway: its id and its API key (256-bit, hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Client {
    id: &'static str,
    key: &'static str,
}

const ALPHA: Client = Client { id: "alpha", key: "3f1c9a7e5b2d4f6081a3c5e7f9b1d3e5a7c9e1f3b5d7f9a1c3e5a7b9d1f3e5c7" };
const BETA: Client = Client { id: "beta", key: "c0ffee00deadbeef8badf00d1337c0de0123456789abcdef0fedcba987654321" };
/// Only sends the body-size checks, so that they cost the loaded clients nothing.
const GAMMA: Client = Client { id: "gamma", key: "77e2b0a4c6d8f0e2a4c6d8f0b2d4f6a8c0e2a4b6d8f0a2c4e6a8b0d2f4a6c8e0" };

// ---------------------------------------------------------------------------
// The example tiers

/// Every `examples/ratelimittier-*.yaml`, by tier name, as users apply them.
fn example_tiers() -> Vec<(String, Limits)> {
    let examples =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()))
            .join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .unwrap_or_else(|e| panic!("read {}: {e}", examples.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("ratelimittier-") && name.ends_with(".yaml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 2, "expected the example tiers in {}, found {files:?}", examples.display());
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).expect("read example");
            let tier: RateLimitTier = serde_yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not a RateLimitTier: {e}", path.display()));
            let name = tier.metadata.name.clone().expect("example tiers are named");
            (name, limits_from_tier(&tier.spec))
        })
        .collect()
}

/// The examples this file was written against are among them: `gold` splits
/// reads from writes and `bronze` does not, so both shapes are loaded.
#[test]
fn the_examples_hold_a_tier_with_reads_and_writes_apart_and_one_without() {
    let tiers: BTreeMap<String, Limits> = example_tiers().into_iter().collect();
    let gold = &tiers["gold"];
    assert_eq!(gold.read, Some(Rate { per_second: 100, burst: 50 }));
    assert_eq!(gold.write, Some(Rate { per_second: 20, burst: 10 }));
    assert_eq!(gold.max_body_bytes, 10 << 20);
    let bronze = &tiers["bronze"];
    assert_eq!((bronze.default, bronze.read, bronze.write), (Rate { per_second: 10, burst: 0 }, None, None));
    assert_eq!(bronze.max_body_bytes, 1 << 20, "the default maxRequestBodySize, 1Mi");
}

#[test]
fn every_example_tier_renders_a_configuration_nginx_accepts() {
    for (name, limits) in example_tiers() {
        let site = Site::new(limits, free_port());
        let output = unprivileged(&NGINX)
            .arg("-t")
            .arg("-c")
            .arg(&site.conf)
            .args(["-g", "daemon off;"])
            .output()
            .expect("run nginx -t");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success() && stderr.contains("test is successful"), "tier {name}: nginx -t: {stderr}");
        println!("tier {name}: nginx -t: test is successful");
    }
}

// ---------------------------------------------------------------------------
// Under load

/// For every example tier, one live gateway: first the load, two clients at
/// once, each driving every class of request the tier limits apart
/// (reads and writes at the same time for `gold`); then the body-size limit.
#[test]
fn every_example_tier_admits_each_client_its_rate_plus_burst_and_refuses_oversized_bodies() {
    for (name, limits) in example_tiers() {
        assert_eq!(
            limits.key,
            LimitKey::Client,
            "tier {name}: this test loads two clients from one loopback address, which a sourceIP tier would \
             count as one"
        );
        let gateway = Gateway::start(limits.clone());
        let streams: Vec<Stream> =
            [ALPHA, BETA].into_iter().flat_map(|client| Stream::all_for(client, &limits)).collect();
        let measured: Vec<Measured> = thread::scope(|scope| {
            let running: Vec<_> = streams.iter().map(|stream| scope.spawn(|| drive(&gateway, stream))).collect();
            running.into_iter().map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });

        let mut failures = Vec::new();
        for (stream, measured) in streams.iter().zip(&measured) {
            let line = format!("{name} {}", measured.report(stream));
            println!("{line}");
            if measured.deviation(stream).abs() > TOLERANCE {
                failures.push(line);
            }
        }
        for (stream, measured) in streams.iter().zip(&measured) {
            measured.assert_overloaded_and_answered(&name, stream);
        }
        // What passed reached the FHIR server, and nothing else did.
        for client in [ALPHA, BETA] {
            for class in [Class::Read, Class::Write] {
                let admitted: usize = streams
                    .iter()
                    .zip(&measured)
                    .filter(|(s, _)| s.client == client)
                    .map(|(s, m)| m.admitted_of(s, class))
                    .sum();
                let reached = gateway.upstream.seen(client, class).requests;
                assert_eq!(reached, admitted, "{name}: {} {class:?}s that reached the FHIR server", client.id);
            }
        }
        assert!(
            failures.is_empty(),
            "tier {name}: admitted rates beyond ±{}%:\n{}",
            TOLERANCE * 100.0,
            failures.join("\n")
        );

        assert_body_limit(&name, &gateway, limits.max_body_bytes);
    }
}

/// A body of exactly the limit reaches the FHIR server; one byte more gets
/// 413 from the gateway and does not.
fn assert_body_limit(tier: &str, gateway: &Gateway, limit: u64) {
    let at_limit = gateway.connect().exchange(&request("POST", "/Binary", GAMMA, limit as usize));
    assert_eq!(at_limit.status, 200, "tier {tier}: a body of exactly {limit} bytes passes: {at_limit:?}");
    let over = gateway.connect().exchange(&request("POST", "/Binary", GAMMA, limit as usize + 1));
    assert_eq!(over.status, 413, "tier {tier}: a body of {} bytes is refused: {over:?}", limit + 1);
    assert!(over.body.contains("too-long"), "a FHIR OperationOutcome: {over:?}");
    let seen = gateway.upstream.seen(GAMMA, Class::Write);
    assert_eq!((seen.requests, seen.body_bytes), (1, limit), "tier {tier}: only the body at the limit went upstream");
    println!("{tier} body limit {limit} bytes: {limit} -> {}, {} -> {}", at_limit.status, limit + 1, over.status);
}

/// Which requests a stream sends, and which of the tier's limits counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// GETs, counted by the read limit.
    Read,
    /// POSTs, counted by the write limit.
    Write,
    /// GETs and POSTs alternately, for a tier with one limit for both.
    Mixed,
}

/// One client's load of one class, aimed at the limit that counts it.
struct Stream {
    client: Client,
    class: Class,
    limit: Rate,
}

impl Stream {
    /// A stream per limit the tier applies: reads and writes apart when it
    /// splits them (a class without its own limit gets the tier's), else one.
    fn all_for(client: Client, limits: &Limits) -> Vec<Stream> {
        if limits.read.is_none() && limits.write.is_none() {
            return vec![Stream { client, class: Class::Mixed, limit: limits.default }];
        }
        vec![
            Stream { client, class: Class::Read, limit: limits.read.unwrap_or(limits.default) },
            Stream { client, class: Class::Write, limit: limits.write.unwrap_or(limits.default) },
        ]
    }

    fn offered_per_second(&self) -> u32 {
        (self.limit.per_second * OVERLOAD).clamp(MIN_OFFERED_PER_SECOND, MAX_OFFERED_PER_SECOND)
    }

    /// The class of the stream's `n`th request.
    fn class_of(&self, n: usize) -> Class {
        match self.class {
            Class::Mixed if n.is_multiple_of(2) => Class::Read,
            Class::Mixed => Class::Write,
            class => class,
        }
    }

    fn request(&self, n: usize) -> Vec<u8> {
        match self.class_of(n) {
            Class::Read => request("GET", &format!("/Patient/{n}"), self.client, 0),
            _ => request("POST", "/Patient", self.client, 64),
        }
    }
}

/// What one stream saw.
struct Measured {
    /// From the first request sent to the last.
    window: Duration,
    sent: usize,
    /// Statuses, in the order the requests were sent.
    statuses: Vec<u16>,
    /// A 429 (the first on the first connection), to check its headers.
    refusal: Option<Response>,
}

impl Measured {
    fn admitted(&self) -> usize {
        self.statuses.iter().filter(|&&s| s == 200).count()
    }

    /// Admitted requests of `class` (a mixed stream's requests alternate).
    fn admitted_of(&self, stream: &Stream, class: Class) -> usize {
        self.statuses.iter().enumerate().filter(|&(n, &s)| s == 200 && stream.class_of(n) == class).count()
    }

    /// How many requests in a row passed before the first refusal.
    fn admitted_at_first(&self) -> usize {
        self.statuses.iter().take_while(|&&s| s == 200).count()
    }

    fn measured_per_second(&self) -> f64 {
        self.admitted() as f64 / self.window.as_secs_f64()
    }

    /// What nginx should admit per second over the window.
    ///
    /// `limit_req ... burst=B nodelay` is a leaky bucket: a request passes
    /// when the bucket, drained at R per second, holds at most B requests
    /// once this one is added. Empty, it lets the first B+1 pass at once (the
    /// first finds nothing ahead of it), then one every 1/R s: over W seconds
    /// of load above the limit, 1 + B + R·W requests, R + (B+1)/W per second.
    fn expected_per_second(&self, limit: Rate) -> f64 {
        limit.per_second as f64 + (limit.burst + 1) as f64 / self.window.as_secs_f64()
    }

    /// Measured over expected, minus one.
    fn deviation(&self, stream: &Stream) -> f64 {
        self.measured_per_second() / self.expected_per_second(stream.limit) - 1.0
    }

    fn report(&self, stream: &Stream) -> String {
        let class = match stream.class {
            Class::Read => "read",
            Class::Write => "write",
            Class::Mixed => "read+write",
        };
        let window = self.window.as_secs_f64();
        format!(
            "{class} client {}: admitted {:.1}/s ({} of {} sent at {}/s, the first {} in a row), \
             configured {}/s + burst {}+1 over {window:.2} s = {:.1}/s expected ({:+.1}%); \
             a 429's Retry-After: {}",
            stream.client.id,
            self.measured_per_second(),
            self.admitted(),
            self.sent,
            stream.offered_per_second(),
            self.admitted_at_first(),
            stream.limit.per_second,
            stream.limit.burst,
            self.expected_per_second(stream.limit),
            self.deviation(stream) * 100.0,
            self.refusal.as_ref().and_then(|r| r.header("retry-after")).unwrap_or("none"),
        )
    }

    /// Every request got 200 or 429, enough were refused to show the load
    /// was above the limit, and the refusals say when to come back.
    fn assert_overloaded_and_answered(&self, tier: &str, stream: &Stream) {
        let who = format!("{tier} {:?} client {}", stream.class, stream.client.id);
        assert_eq!(self.statuses.len(), self.sent, "{who}: one response per request");
        let others: Vec<&u16> = self.statuses.iter().filter(|s| ![200, 429].contains(*s)).collect();
        assert!(others.is_empty(), "{who}: only 200 and 429 expected, got {others:?}");
        assert!(
            self.sent as f64 >= 2.0 * self.expected_per_second(stream.limit) * self.window.as_secs_f64(),
            "{who}: {} requests are not well above the limit",
            self.sent
        );
        // The window is long next to the burst (gold reads: 51 of 451), so
        // the rate alone would not show a burst missing: it lets the first
        // B+1 requests through at once, where a limit without one would
        // refuse the second (offered 3 to 10 times faster than it drains).
        let burst = stream.limit.burst as usize + 1;
        assert!(
            self.admitted_at_first() >= burst,
            "{who}: the burst lets the first {burst} requests pass at once, got {:?}",
            &self.statuses[..burst.min(self.statuses.len())]
        );
        let refusal = self.refusal.as_ref().unwrap_or_else(|| panic!("{who}: nothing was refused"));
        let retry_after = refusal.header("retry-after").unwrap_or_else(|| panic!("{who}: 429 without Retry-After"));
        assert!(
            retry_after.parse::<u32>().is_ok_and(|s| s >= 1),
            "{who}: Retry-After is whole seconds, at least 1: {refusal:?}"
        );
        assert!(refusal.body.contains("throttled"), "{who}: a FHIR OperationOutcome: {refusal:?}");
    }
}

/// Offers `stream` to the gateway at its rate for [`WINDOW`], then collects
/// every answer.
fn drive(gateway: &Gateway, stream: &Stream) -> Measured {
    let offered = stream.offered_per_second();
    let total = (offered as f64 * WINDOW.as_secs_f64()) as usize;
    let mut connections: Vec<Connection> =
        (0..total.div_ceil(MAX_REQUESTS_PER_CONNECTION)).map(|_| gateway.connect()).collect();
    let interval = Duration::from_secs(1) / offered;
    let start = Instant::now();
    let mut sent_at = Vec::with_capacity(total);
    for n in 0..total {
        let due = start + interval * n as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let count = connections.len();
        connections[n % count].send(&stream.request(n));
        sent_at.push(Instant::now());
    }
    let deadline = Instant::now() + PATIENCE;
    let mut statuses = vec![0; total];
    let mut refusal = None;
    for (c, connection) in connections.iter().enumerate() {
        for n in (c..total).step_by(connections.len()) {
            let response = connection.receive(deadline);
            statuses[n] = response.status;
            if response.status == 429 && refusal.is_none() {
                refusal = Some(response);
            }
        }
    }
    Measured { window: sent_at[total - 1] - sent_at[0], sent: total, statuses, refusal }
}

/// An HTTP/1.1 request with the client's key and a body of `body` bytes.
fn request(method: &str, path: &str, client: Client, body: usize) -> Vec<u8> {
    let mut bytes = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {}\r\nAccept: application/fhir+json\r\n",
        client.key
    )
    .into_bytes();
    if body > 0 {
        bytes.extend(format!("Content-Type: application/fhir+json\r\nContent-Length: {body}\r\n").as_bytes());
    }
    bytes.extend(b"\r\n");
    bytes.resize(bytes.len() + body, b' ');
    bytes
}

// ---------------------------------------------------------------------------
// Tools and processes

// ---------------------------------------------------------------------------
// The gateway: configuration on disk, nginx, the stub FHIR server

/// One gateway's files in a temp dir: the operator-issued certificate, the
/// key map of the three clients and the rendered configuration.
struct Site {
    dir: tempfile::TempDir,
    conf: PathBuf,
    cert: PathBuf,
    port: u16,
}

impl Site {
    fn new(limits: Limits, upstream_port: u16) -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let path = |name: &str| dir.path().join(name).to_str().expect("UTF-8 temp path").to_owned();
        let settings = GatewaySettings {
            listen: format!("127.0.0.1:{port}"),
            upstream: format!("127.0.0.1:{upstream_port}"),
            public_host: "localhost".into(),
            public_port: port,
            tls_certificate: path("tls.crt"),
            tls_certificate_key: path("tls.key"),
            api_keys_map: path("api-keys.map"),
            temp_dir: path("run"),
            access_log: path("access.log"),
            access_log_syslog: None,
            limits,
            auth: None,
        };
        let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (cert, key) = tls::issue(&names, k8s_openapi::jiff::Timestamp::now()).expect("issue a certificate");
        std::fs::write(&settings.tls_certificate, cert).expect("write certificate");
        std::fs::write(&settings.tls_certificate_key, key).expect("write key");
        let keys: Vec<(String, String)> =
            [ALPHA, BETA, GAMMA].iter().map(|c| (c.key.to_owned(), c.id.to_owned())).collect();
        std::fs::write(&settings.api_keys_map, api_keys_map(&keys).expect("key map")).expect("write key map");
        std::fs::create_dir(&settings.temp_dir).expect("nginx temp dir");
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&settings).expect("configuration renders")).expect("write nginx.conf");
        if running_as_root() {
            // nginx runs as nobody: it must read its key and own its temp dir.
            let entries = std::fs::read_dir(dir.path()).expect("read temp dir").map(|e| e.expect("entry").path());
            for path in entries.chain([dir.path().to_owned()]) {
                std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown");
            }
        }
        Site { cert: PathBuf::from(&settings.tls_certificate), dir, conf, port }
    }
}

/// What reached the stub FHIR server from one client, for one class.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Seen {
    requests: usize,
    body_bytes: u64,
}

/// A keep-alive HTTP/1.1 server on loopback standing in for the FHIR
/// server: answers every request 200 at once and counts, per client id
/// (the X-Client-ID the gateway sets) and class, what reached it.
struct Upstream {
    port: u16,
    seen: Arc<Mutex<BTreeMap<(String, bool), Seen>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stub upstream");
        let port = listener.local_addr().expect("address").port();
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen_by_acceptor, stopping) = (seen.clone(), stop.clone());
        let acceptor = thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let seen = seen_by_acceptor.clone();
                    // Ends when nginx closes the connection, or after PATIENCE idle.
                    thread::spawn(move || serve(stream, &seen));
                }
            }
        });
        Upstream { port, seen, stop, acceptor: Some(acceptor) }
    }

    fn seen(&self, client: Client, class: Class) -> Seen {
        let key = (client.id.to_owned(), class == Class::Write);
        self.seen.lock().expect("stub counts").get(&key).copied().unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the blocked accept
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Serves requests on one connection until it closes.
fn serve(stream: TcpStream, seen: &Mutex<BTreeMap<(String, bool), Seen>>) {
    let _ = stream.set_read_timeout(Some(PATIENCE));
    let mut reader = BufReader::new(&stream);
    while let Some(head) = read_head(&mut reader) {
        // nginx buffers request bodies and sends them with a Content-Length.
        let length: u64 = head.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let Ok(body_bytes) = std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink()) else { return };
        let write = !["GET", "HEAD", "OPTIONS"].contains(&head.start.split(' ').next().unwrap_or_default());
        let client = head.header("x-client-id").unwrap_or_default().to_owned();
        let mut counts = seen.lock().expect("stub counts");
        let entry = counts.entry((client, write)).or_default();
        entry.requests += 1;
        entry.body_bytes += body_bytes;
        drop(counts);
        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}";
        if (&stream).write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// nginx in front of the stub upstream. Fields drop in order: nginx stops
/// first, the temp dir goes last.
struct Gateway {
    nginx: Nginx,
    upstream: Upstream,
    site: Site,
}

impl Gateway {
    fn start(limits: Limits) -> Gateway {
        let upstream = Upstream::start();
        let site = Site::new(limits, upstream.port);
        let nginx = Nginx::start(&site.conf, site.dir.path(), site.port);
        Gateway { nginx, upstream, site }
    }

    fn connect(&self) -> Connection {
        Connection::open(&self.site, self.nginx.stderr_path())
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 over openssl s_client

/// A request or response head: its first line and headers (names lowercased).
#[derive(Debug)]
struct Head {
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Reads one head; None at the end of the stream or on a read error.
fn read_head(reader: &mut impl BufRead) -> Option<Head> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let start = line.trim_end().to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let Some((name, value)) = line.trim_end().split_once(':') else { break };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    Some(Head { start, headers })
}

/// A response from the gateway.
#[derive(Debug)]
struct Response {
    status: u16,
    head: Head,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }
}

/// Reads one response (never to a HEAD: it relies on Content-Length).
fn read_response(reader: &mut impl BufRead) -> Result<Option<Response>, String> {
    let Some(head) = read_head(reader) else { return Ok(None) };
    let status = match head.start.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)) {
        Some(code) => code.parse().map_err(|_| format!("not a status line: {:?}", head.start))?,
        None => return Err(format!("not a status line: {:?}", head.start)),
    };
    let length: usize = head.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| format!("response body: {e}"))?;
    Ok(Some(Response { status, head, body: String::from_utf8_lossy(&body).into_owned() }))
}

/// One keep-alive TLS 1.3 connection to the gateway: an `openssl s_client`
/// process that verifies the certificate, takes requests on stdin and
/// gives responses on stdout, read by a thread into a channel. Dropping it
/// kills the process, which ends the thread.
struct Connection {
    child: Child,
    stdin: ChildStdin,
    responses: mpsc::Receiver<Result<Response, String>>,
    reader: Option<JoinHandle<()>>,
    stderr: PathBuf,
    nginx_stderr: PathBuf,
}

impl Connection {
    /// Connects, and proves the TLS session up with a request to the
    /// health path (not rate limited, so it costs no client's budget).
    fn open(site: &Site, nginx_stderr: &Path) -> Connection {
        let stderr = tempfile::Builder::new().suffix(".s_client").tempfile_in(site.dir.path()).expect("stderr file");
        let (file, stderr) = stderr.keep().expect("keep stderr file");
        let mut child = Command::new(tool(&OPENSSL))
            .args(["s_client", "-connect", &format!("127.0.0.1:{}", site.port), "-tls1_3", "-quiet", "-nocommands"])
            .arg("-CAfile")
            .arg(&site.cert)
            .args(["-verify_return_error", "-verify_ip", "127.0.0.1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("start openssl s_client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, responses) = mpsc::channel();
        let reader = thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            while let Some(result) = read_response(&mut stdout).transpose() {
                let failed = result.is_err();
                if sender.send(result).is_err() || failed {
                    return;
                }
            }
        });
        let mut connection =
            Connection { child, stdin, responses, reader: Some(reader), stderr, nginx_stderr: nginx_stderr.to_owned() };
        let health = connection.exchange(format!("GET {HEALTH_PATH} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes());
        assert_eq!((health.status, health.body.as_str()), (200, "ok"), "TLS 1.3 session up");
        connection
    }

    /// Writes a request (or several, pipelined).
    fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stdin.write_all(bytes) {
            panic!("writing to s_client: {e}\n{}", self.diagnostics());
        }
    }

    /// The next response, by `deadline`.
    fn receive(&self, deadline: Instant) -> Response {
        match self.responses.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => panic!("unreadable response: {e}\n{}", self.diagnostics()),
            Err(e) => panic!("no response ({e})\n{}", self.diagnostics()),
        }
    }

    /// Sends one request and waits for its response. A write error is not
    /// fatal: nginx may answer (413) and close before the body is through.
    fn exchange(&mut self, bytes: &[u8]) -> Response {
        let _ = self.stdin.write_all(bytes);
        self.receive(Instant::now() + PATIENCE)
    }

    fn diagnostics(&self) -> String {
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        format!("s_client stderr:\n{}\nnginx stderr:\n{}", read(&self.stderr), read(&self.nginx_stderr))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
