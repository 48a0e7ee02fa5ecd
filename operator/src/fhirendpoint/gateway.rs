//! The nginx gateway in front of every FHIR server: its configuration,
//! rendered by the operator into the endpoint's ConfigMap, and the API-key
//! map file, rendered into the endpoint's gateway-keys Secret.
//!
//! Pure functions: the same settings always give the same bytes.

/// HTTPS port the gateway listens on (the Service maps 443 to it).
pub const HTTPS_PORT: u16 = 8443;
/// Port of the FHIR server inside the pod; only the gateway talks to it.
pub const UPSTREAM_PORT: u16 = 8080;
/// Where nginx sends a copy of every access-log line (syslog over UDP on
/// loopback), for the gateway-metrics sidecar.
pub const SYSLOG_ADDRESS: &str = "127.0.0.1:5140";
/// Port of the gateway-metrics sidecar's Prometheus endpoint.
pub const METRICS_PORT: u16 = 9113;

/// The access log: one JSON object per line (nginx `escape=json`), the
/// audit trail of who did what. Fields, in this order:
/// - `time`: ISO 8601 with offset (`$time_iso8601`)
/// - `request_id`: nginx's `$request_id`
/// - `client`: client id the API key maps to; empty when no valid key
/// - `remote_addr`
/// - `method`
/// - `path`: `$uri`, never the query string (FHIR search parameters can
///   carry patient data)
/// - `status`: number
/// - `request_time`: seconds, number (`$request_time`)
/// - `upstream_time`: string (`$upstream_response_time`, may be empty)
/// - `bytes_sent`: number (`$body_bytes_sent`)
/// - `tls_protocol`: `$ssl_protocol`
pub const ACCESS_LOG_FIELDS: [&str; 11] = [
    "time",
    "request_id",
    "client",
    "remote_addr",
    "method",
    "path",
    "status",
    "request_time",
    "upstream_time",
    "bytes_sent",
    "tls_protocol",
];

/// What a rate limit counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey {
    /// The client id the request's API key maps to.
    Client,
    /// The request's source address.
    SourceIp,
}

/// Sustained requests per second and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// Rate and size limits, from the endpoint's RateLimitTier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub key: LimitKey,
    /// Applies to a method class that has no limit of its own.
    pub default: Rate,
    /// GET, HEAD, OPTIONS.
    pub read: Option<Rate>,
    /// POST, PUT, PATCH, DELETE.
    pub write: Option<Rate>,
    /// Largest request body accepted; 413 beyond.
    pub max_body_bytes: u64,
}

/// Everything the nginx configuration depends on. Paths are absolute; in a
/// pod they are the mounts the Deployment builder sets up, in tests
/// temporary files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySettings {
    /// Address nginx listens on for HTTPS, e.g. `8443` or `127.0.0.1:18443`.
    pub listen: String,
    /// The FHIR server, e.g. `127.0.0.1:8080`.
    pub upstream: String,
    pub tls_certificate: String,
    pub tls_certificate_key: String,
    /// The API-key map file (see [`api_keys_map`]), from a Secret volume.
    pub api_keys_map: String,
    /// Writable directory for the pid file and temp files (an emptyDir:
    /// the root filesystem is read-only).
    pub temp_dir: String,
    /// Where the JSON access log goes (the audit trail), e.g. `/dev/stdout`.
    pub access_log: String,
    /// Optional syslog copy of the access log for the metrics sidecar,
    /// e.g. [`SYSLOG_ADDRESS`].
    pub access_log_syslog: Option<String>,
    pub limits: Limits,
}

/// Renders `nginx.conf` (a complete main configuration, valid for
/// `nginx -t -c FILE`).
pub fn nginx_conf(settings: &GatewaySettings) -> String {
    let _ = settings;
    todo!("gateway configuration")
}

/// Renders the API-key map file: each key mapped to its client id. It holds
/// key material and so only ever goes into a Secret. `keys` holds
/// (key, client id) pairs; the output is sorted for determinism.
pub fn api_keys_map(keys: &[(String, String)]) -> String {
    let _ = keys;
    todo!("api key map")
}
