//! `fhir-operator gateway-metrics`: the sidecar beside nginx that receives
//! the gateway's JSON access log over syslog (UDP, loopback) and serves it
//! as Prometheus metrics for the endpoint's alerts.
//!
//! Parsing and counting ([`parse_datagram`], [`GatewayMetrics`],
//! [`certificate_not_after`]) are pure and unit-tested; [`run`] only moves
//! bytes between the sockets and them. Nothing received is trusted: a
//! datagram that does not parse increments
//! `fhir_gateway_log_parse_errors_total` and is otherwise dropped.
//!
//! Only bounded label values are exported: the method and status classes,
//! the rejection reason, and the client id, which nginx takes from the
//! operator's own API-key map (empty when no valid key was sent). The path,
//! the remote address and the request id stay in the audit log: they are
//! unbounded and may identify patients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::{TcpListener, UdpSocket};

use crate::fhirendpoint::gateway::{METRICS_PORT, SYSLOG_ADDRESS};

/// Syslog tag nginx puts before every access-log line it sends here
/// (`access_log syslog:server=...,tag=fhir_gateway`).
pub const SYSLOG_TAG: &str = "fhir_gateway";

/// Every request nginx answered.
/// Labels: `client`, `method_class` ([`MethodClass`]), `status_class` ([`StatusClass`]).
pub const REQUESTS_TOTAL: &str = "fhir_gateway_requests_total";
/// Requests the gateway turned away (401, 403, 413, 429), a subset of
/// [`REQUESTS_TOTAL`]. Labels: `client`, `reason` ([`RejectionReason`]).
pub const REJECTIONS_TOTAL: &str = "fhir_gateway_rejections_total";
/// Histogram of nginx's `$request_time` in seconds, buckets
/// [`DURATION_BUCKETS`]. Label: `method_class`. Series `_bucket`, `_sum`, `_count`.
pub const REQUEST_DURATION_SECONDS: &str = "fhir_gateway_request_duration_seconds";
/// Datagrams that were not an access-log line of the expected shape.
pub const LOG_PARSE_ERRORS_TOTAL: &str = "fhir_gateway_log_parse_errors_total";
/// Earliest notAfter (Unix seconds) of the certificates in the file given
/// by `--tls-certificate`; exported only with that flag. 0 until the file
/// has been read successfully once, so an unreadable certificate alerts.
pub const CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str = "fhir_gateway_certificate_expiry_timestamp_seconds";
/// Failed attempts to read or parse the `--tls-certificate` file (it is
/// read again at every scrape, so a renewed certificate shows at once).
pub const CERTIFICATE_READ_ERRORS_TOTAL: &str = "fhir_gateway_certificate_read_errors_total";

/// Upper bounds (seconds) of the latency histogram: fine below a second,
/// where latency SLOs sit, and up to 30 s, beyond which clients time out.
pub const DURATION_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0];

/// Content type of `/metrics`: prometheus-client writes OpenMetrics text.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Largest UDP payload; a longer syslog line cannot arrive in one datagram.
const MAX_DATAGRAM: usize = 65_536;

/// Command-line arguments of `fhir-operator gateway-metrics`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// UDP address nginx sends its access log to (syslog).
    #[arg(long, value_name = "ADDR", default_value = SYSLOG_ADDRESS)]
    pub syslog_listen: SocketAddr,
    /// TCP address of the `/metrics` and `/healthz` HTTP endpoint.
    #[arg(long, value_name = "ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], METRICS_PORT)))]
    pub metrics_listen: SocketAddr,
    /// PEM certificate the gateway serves; its notAfter is exported as
    /// `fhir_gateway_certificate_expiry_timestamp_seconds`.
    #[arg(long, value_name = "PATH")]
    pub tls_certificate: Option<PathBuf>,
}

/// The fields of one access-log line that the metrics use (the others,
/// see `gateway::ACCESS_LOG_FIELDS`, are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AccessLogEntry {
    /// Client id of the API key; empty when no valid key was sent.
    pub client: String,
    pub method: String,
    pub status: u16,
    /// Seconds from the first byte read to the last byte sent.
    pub request_time: f64,
}

/// Why a datagram was not counted as a request.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("datagram is not UTF-8")]
    NotUtf8,
    #[error("no `{SYSLOG_TAG}: ` syslog tag")]
    MissingTag,
    #[error("access-log JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("status {0} is not an HTTP status")]
    Status(u16),
    #[error("request_time {0} is not a duration")]
    RequestTime(f64),
}

/// Parses one syslog datagram as nginx sends it,
/// `<PRI>Mmm dd hh:mm:ss hostname fhir_gateway: {json}`, into the fields
/// the metrics use. The hostname is optional (nginx's `nohostname`).
pub fn parse_datagram(datagram: &[u8]) -> Result<AccessLogEntry, ParseError> {
    let line = std::str::from_utf8(datagram).map_err(|_| ParseError::NotUtf8)?;
    // The header (PRI, timestamp, hostname) holds no ": ", so the first
    // tag is the one nginx wrote, even if the JSON repeats the text.
    let marker = format!("{SYSLOG_TAG}: ");
    let json = line.split_once(&marker).map(|(_, json)| json).ok_or(ParseError::MissingTag)?;
    let entry: AccessLogEntry = serde_json::from_str(json.trim_end())?;
    if StatusClass::of(entry.status).is_none() {
        return Err(ParseError::Status(entry.status));
    }
    if !(entry.request_time.is_finite() && entry.request_time >= 0.0) {
        return Err(ParseError::RequestTime(entry.request_time));
    }
    Ok(entry)
}

/// `method_class` label: the split the rate-limit tiers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MethodClass {
    /// GET, HEAD, OPTIONS.
    Read,
    /// POST, PUT, PATCH, DELETE.
    Write,
    /// Anything else, e.g. the garbage of a malformed request line.
    Other,
}

impl MethodClass {
    pub fn of(method: &str) -> Self {
        match method {
            "GET" | "HEAD" | "OPTIONS" => Self::Read,
            "POST" | "PUT" | "PATCH" | "DELETE" => Self::Write,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Other => "other",
        }
    }
}

/// `status_class` label: `1xx` to `5xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

impl StatusClass {
    /// None for a number outside 100..=599.
    pub fn of(status: u16) -> Option<Self> {
        Some(match status {
            100..=199 => Self::Informational,
            200..=299 => Self::Success,
            300..=399 => Self::Redirection,
            400..=499 => Self::ClientError,
            500..=599 => Self::ServerError,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Informational => "1xx",
            Self::Success => "2xx",
            Self::Redirection => "3xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
        }
    }
}

/// `reason` label of [`REJECTIONS_TOTAL`]: the gateway's own refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectionReason {
    /// 401: no API key, or one the key map does not hold; a bad token.
    Unauthorized,
    /// 403: the client's scopes do not allow the interaction.
    Forbidden,
    /// 413: request body above the tier's limit.
    BodyTooLarge,
    /// 429: above the tier's rate.
    RateLimited,
}

impl RejectionReason {
    pub fn of(status: u16) -> Option<Self> {
        match status {
            401 => Some(Self::Unauthorized),
            403 => Some(Self::Forbidden),
            413 => Some(Self::BodyTooLarge),
            429 => Some(Self::RateLimited),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::BodyTooLarge => "body_too_large",
            Self::RateLimited => "rate_limited",
        }
    }
}

macro_rules! label_value_as_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )*};
}
label_value_as_str!(MethodClass, StatusClass, RejectionReason);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    client: String,
    method_class: MethodClass,
    status_class: StatusClass,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectionLabels {
    client: String,
    reason: RejectionReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DurationLabels {
    method_class: MethodClass,
}

type DurationFamily = Family<DurationLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Counters exported as `<name>_total`: prometheus-client adds the suffix.
fn counter_base(total: &str) -> &str {
    total.strip_suffix("_total").unwrap_or(total)
}

#[derive(Debug)]
struct CertificateMetrics {
    expiry: Gauge,
    read_errors: Counter,
}

/// The sidecar's metrics and their registry.
#[derive(Debug)]
pub struct GatewayMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    rejections: Family<RejectionLabels, Counter>,
    durations: DurationFamily,
    parse_errors: Counter,
    certificate: Option<CertificateMetrics>,
}

impl GatewayMetrics {
    /// `with_certificate`: also export the certificate expiry gauge and its
    /// read-error counter.
    pub fn new(with_certificate: bool) -> Self {
        let requests = Family::default();
        let rejections = Family::default();
        let durations = DurationFamily::new_with_constructor(duration_histogram);
        let parse_errors = Counter::default();
        let mut registry = Registry::default();
        registry.register(counter_base(REQUESTS_TOTAL), "Requests the gateway answered", requests.clone());
        registry.register(
            counter_base(REJECTIONS_TOTAL),
            "Requests the gateway refused: missing or unknown API key, body too large, rate limited",
            rejections.clone(),
        );
        registry.register(REQUEST_DURATION_SECONDS, "Gateway request time in seconds", durations.clone());
        registry.register(
            counter_base(LOG_PARSE_ERRORS_TOTAL),
            "Syslog datagrams that were not a gateway access-log line",
            parse_errors.clone(),
        );
        let certificate = with_certificate.then(|| {
            let metrics = CertificateMetrics { expiry: Gauge::default(), read_errors: Counter::default() };
            registry.register(
                CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS,
                "Earliest notAfter of the gateway's certificate chain, Unix seconds (0: never read)",
                metrics.expiry.clone(),
            );
            registry.register(
                counter_base(CERTIFICATE_READ_ERRORS_TOTAL),
                "Failed reads of the gateway's certificate file",
                metrics.read_errors.clone(),
            );
            metrics
        });
        Self { registry, requests, rejections, durations, parse_errors, certificate }
    }

    /// Where other metrics of the same process register, so that one
    /// `/metrics` serves them all (the audit sidecar's).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts an access-log line that could not be read (from a file,
    /// where there is no datagram).
    pub fn observe_unreadable(&self) {
        self.parse_errors.inc();
    }

    /// Counts one datagram: as a request when it parses, else as a parse error.
    pub fn record_datagram(&self, datagram: &[u8]) -> Result<(), ParseError> {
        let parsed = parse_datagram(datagram);
        match &parsed {
            Ok(entry) => self.observe(entry),
            Err(_) => {
                self.parse_errors.inc();
            }
        }
        parsed.map(drop)
    }

    /// Counts one request. `entry` must have a status within 100..=599 (as
    /// [`parse_datagram`] guarantees); any other is counted as a parse error.
    pub fn observe(&self, entry: &AccessLogEntry) {
        let Some(status_class) = StatusClass::of(entry.status) else {
            self.parse_errors.inc();
            return;
        };
        let method_class = MethodClass::of(&entry.method);
        self.requests.get_or_create(&RequestLabels { client: entry.client.clone(), method_class, status_class }).inc();
        if let Some(reason) = RejectionReason::of(entry.status) {
            self.rejections.get_or_create(&RejectionLabels { client: entry.client.clone(), reason }).inc();
        }
        self.durations.get_or_create(&DurationLabels { method_class }).observe(entry.request_time);
    }

    /// Records the outcome of reading the certificate: the expiry on
    /// success (a failure keeps the last value). No-op without a certificate.
    pub fn record_certificate(&self, not_after: Result<i64, CertificateError>) {
        let Some(metrics) = &self.certificate else { return };
        match not_after {
            Ok(seconds) => {
                metrics.expiry.set(seconds);
            }
            Err(e) => {
                metrics.read_errors.inc();
                tracing::warn!(error = %e, "cannot read the gateway certificate");
            }
        }
    }

    /// The OpenMetrics text exposition, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Why the certificate's expiry is unknown.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("reading the certificate file: {0}")]
    Io(#[from] std::io::Error),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("X.509: {0}")]
    X509(String),
    #[error("no CERTIFICATE block in the PEM file")]
    NoCertificate,
}

/// Earliest notAfter (Unix seconds) of the `CERTIFICATE` blocks of a PEM
/// file: a chain stops working when its first certificate expires.
pub fn certificate_not_after(pem: &[u8]) -> Result<i64, CertificateError> {
    let mut earliest: Option<i64> = None;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| CertificateError::Pem(e.to_string()))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let certificate = block.parse_x509().map_err(|e| CertificateError::X509(e.to_string()))?;
        let not_after = certificate.validity().not_after.timestamp();
        earliest = Some(earliest.map_or(not_after, |e| e.min(not_after)));
    }
    earliest.ok_or(CertificateError::NoCertificate)
}

struct Sidecar {
    metrics: Arc<GatewayMetrics>,
    certificate: Option<PathBuf>,
}

impl Sidecar {
    async fn refresh_certificate(&self) {
        if let Some(path) = &self.certificate {
            let not_after = match tokio::fs::read(path).await {
                Ok(pem) => certificate_not_after(&pem),
                Err(e) => Err(e.into()),
            };
            self.metrics.record_certificate(not_after);
        }
    }
}

/// Runs the sidecar until the process is stopped (SIGTERM or SIGINT, which
/// end it cleanly: as a container's PID 1 it gets no default handlers).
pub async fn run(args: Args) -> std::io::Result<()> {
    let metrics = Arc::new(GatewayMetrics::new(args.tls_certificate.is_some()));
    // Both sockets are bound before anything is served, so a `/healthz`
    // answer means datagrams are being received.
    let socket = UdpSocket::bind(args.syslog_listen).await?;
    let listener = TcpListener::bind(args.metrics_listen).await?;
    tracing::info!(syslog = %socket.local_addr()?, metrics = %listener.local_addr()?, "gateway-metrics listening");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        received = receive(socket, &metrics) => received,
        served = serve(listener, Arc::clone(&metrics), args.tls_certificate) => served,
        _ = terminate.recv() => Ok(()),
        interrupted = tokio::signal::ctrl_c() => interrupted,
    }
}

/// Serves `/metrics` (re-reading `certificate` at every scrape) and
/// `/healthz` on `listener` until an error.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<GatewayMetrics>,
    certificate: Option<PathBuf>,
) -> std::io::Result<()> {
    let sidecar = Arc::new(Sidecar { metrics, certificate });
    sidecar.refresh_certificate().await;
    let app = axum::Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(sidecar);
    axum::serve(listener, app).await
}

async fn receive(socket: UdpSocket, metrics: &GatewayMetrics) -> std::io::Result<()> {
    let mut buffer = vec![0; MAX_DATAGRAM];
    loop {
        let (length, _) = socket.recv_from(&mut buffer).await?;
        if let Err(e) = metrics.record_datagram(&buffer[..length]) {
            // The error only: the line itself may hold a patient's resource id.
            tracing::debug!(error = %e, "dropped a syslog datagram");
        }
    }
}

async fn serve_metrics(State(sidecar): State<Arc<Sidecar>>) -> Response {
    sidecar.refresh_certificate().await;
    match sidecar.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"<190>Mar  7 09:05:01 fhir-0 fhir_gateway: {"time":"2025-03-07T09:05:01+00:00","request_id":"4f1c","client":"billing","remote_addr":"10.0.0.7","method":"GET","path":"/fhir/Patient","status":200,"request_time":0.042,"upstream_time":"0.040","bytes_sent":512,"tls_protocol":"TLSv1.3"}"#;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn parses_the_nginx_syslog_line() {
        let entry = parse_datagram(LINE.as_bytes()).expect("parses");
        assert_eq!(
            entry,
            AccessLogEntry { client: "billing".into(), method: "GET".into(), status: 200, request_time: 0.042 }
        );
    }

    #[test]
    fn parses_without_hostname_and_with_the_tag_inside_the_json() {
        let line = r#"<190>Mar 17 09:05:01 fhir_gateway: {"client":"","method":"POST","path":"/fhir_gateway: x","status":401,"request_time":0,"upstream_time":""}"#;
        let entry = parse_datagram(format!("{line}\n").as_bytes()).expect("parses");
        assert_eq!((entry.client.as_str(), entry.status), ("", 401));
    }

    #[test]
    fn rejects_what_is_not_an_access_log_line() {
        let cases: [&[u8]; 7] = [
            b"",
            b"\xff\xfe",
            b"<190>Mar  7 09:05:01 host other_tag: {}",
            b"<190>Mar  7 09:05:01 host fhir_gateway: {\"client\":\"a\",\"method\":\"GET\"",
            b"<190>Mar  7 09:05:01 host fhir_gateway: {\"client\":\"a\",\"method\":\"GET\",\"status\":\"200\",\"request_time\":1}",
            b"<190>Mar  7 09:05:01 host fhir_gateway: {\"client\":\"a\",\"method\":\"GET\",\"status\":600,\"request_time\":1}",
            b"<190>Mar  7 09:05:01 host fhir_gateway: {\"client\":\"a\",\"method\":\"GET\",\"status\":200,\"request_time\":-1}",
        ];
        let metrics = GatewayMetrics::new(false);
        for case in cases {
            assert!(metrics.record_datagram(case).is_err(), "{:?}", String::from_utf8_lossy(case));
        }
        let text = metrics.encode().expect("encodes");
        assert_eq!(sample(&text, LOG_PARSE_ERRORS_TOTAL), Some(7.0));
        assert!(!text.contains(REQUESTS_TOTAL), "no request counted:\n{text}");
    }

    #[test]
    fn classes_and_reasons() {
        assert_eq!(MethodClass::of("HEAD"), MethodClass::Read);
        assert_eq!(MethodClass::of("PATCH"), MethodClass::Write);
        assert_eq!(MethodClass::of("get"), MethodClass::Other);
        assert_eq!(StatusClass::of(499).map(StatusClass::as_str), Some("4xx"));
        assert_eq!(StatusClass::of(99), None);
        assert_eq!(RejectionReason::of(429).map(RejectionReason::as_str), Some("rate_limited"));
        assert_eq!(RejectionReason::of(403), Some(RejectionReason::Forbidden));
        assert_eq!(RejectionReason::of(404), None);
    }

    #[test]
    fn counts_requests_rejections_and_durations() {
        let metrics = GatewayMetrics::new(false);
        let entry = |client: &str, method: &str, status, request_time| AccessLogEntry {
            client: client.into(),
            method: method.into(),
            status,
            request_time,
        };
        metrics.observe(&entry("billing", "GET", 200, 0.004));
        metrics.observe(&entry("billing", "GET", 200, 0.6));
        metrics.observe(&entry("billing", "PUT", 503, 31.0));
        metrics.observe(&entry("", "GET", 401, 0.0));
        metrics.observe(&entry("billing", "POST", 429, 0.0));
        let text = metrics.encode().expect("encodes");
        let requests = |labels: &str| sample(&text, &format!("{REQUESTS_TOTAL}{{{labels}}}"));
        assert_eq!(requests(r#"client="billing",method_class="read",status_class="2xx""#), Some(2.0));
        assert_eq!(requests(r#"client="billing",method_class="write",status_class="5xx""#), Some(1.0));
        assert_eq!(requests(r#"client="",method_class="read",status_class="4xx""#), Some(1.0));
        let rejections = |labels: &str| sample(&text, &format!("{REJECTIONS_TOTAL}{{{labels}}}"));
        assert_eq!(rejections(r#"client="",reason="unauthorized""#), Some(1.0));
        assert_eq!(rejections(r#"client="billing",reason="rate_limited""#), Some(1.0));
        let bucket = |class: &str, le: &str| {
            sample(&text, &format!("{REQUEST_DURATION_SECONDS}_bucket{{le=\"{le}\",method_class=\"{class}\"}}"))
        };
        assert_eq!(bucket("read", "0.005"), Some(2.0), "{text}");
        assert_eq!(bucket("read", "0.5"), Some(2.0));
        assert_eq!(bucket("read", "0.75"), Some(3.0));
        assert_eq!(bucket("write", "30.0"), Some(1.0));
        assert_eq!(bucket("write", "+Inf"), Some(2.0));
        assert_eq!(sample(&text, &format!("{REQUEST_DURATION_SECONDS}_count{{method_class=\"read\"}}")), Some(3.0));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = GatewayMetrics::new(false);
        let client = "a\"b\\c\nd";
        metrics.observe(&AccessLogEntry {
            client: client.into(),
            method: "GET".into(),
            status: 200,
            request_time: 0.1,
        });
        let text = metrics.encode().expect("encodes");
        assert!(text.contains(r#"client="a\"b\\c\nd""#), "{text}");
    }

    #[test]
    fn certificate_gauge_only_with_a_certificate() {
        assert!(!GatewayMetrics::new(false).encode().expect("encodes").contains(CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS));
        let metrics = GatewayMetrics::new(true);
        assert_eq!(metrics.encode().ok().and_then(|t| sample(&t, CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS)), Some(0.0));
        metrics.record_certificate(Ok(1_900_000_000));
        metrics.record_certificate(certificate_not_after(b"not a certificate"));
        let text = metrics.encode().expect("encodes");
        assert_eq!(sample(&text, CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS), Some(1_900_000_000.0), "kept on error");
        assert_eq!(sample(&text, CERTIFICATE_READ_ERRORS_TOTAL), Some(1.0));
    }

    #[test]
    fn certificate_not_after_is_the_earliest_of_the_chain() {
        let pem = |not_after: (i32, u8, u8)| {
            let mut params = rcgen::CertificateParams::new(vec!["fhir.example".to_owned()]).expect("params");
            params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
            let key = rcgen::KeyPair::generate().expect("key");
            params.self_signed(&key).expect("certificate").pem()
        };
        let chain = format!("{}{}", pem((2031, 1, 2)), pem((2030, 6, 1)));
        // 2030-06-01T00:00:00Z, the earlier of the two, though it comes second.
        assert_eq!(certificate_not_after(chain.as_bytes()).expect("parses"), 1_906_502_400);
        let key_only = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(certificate_not_after(key_only.as_bytes()), Err(CertificateError::NoCertificate)));
    }

    #[test]
    fn default_addresses_follow_the_gateway_contract() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let args = Cli::parse_from(["gateway-metrics"]).args;
        assert_eq!(args.syslog_listen.to_string(), SYSLOG_ADDRESS);
        assert_eq!(args.metrics_listen.to_string(), "0.0.0.0:9113");
        assert_eq!(args.tls_certificate, None);
    }
}
