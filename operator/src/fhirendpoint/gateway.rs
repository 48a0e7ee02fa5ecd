//! The nginx gateway in front of every FHIR server: its configuration,
//! rendered by the operator into the endpoint's ConfigMap, and the API-key
//! map file, rendered into the endpoint's gateway-keys Secret.
//!
//! Pure functions: the same settings always give the same bytes. Both refuse
//! input that would make nginx misread its configuration, rather than
//! render it: see [`GatewayError`].

use std::collections::BTreeMap;

/// HTTPS port the gateway listens on (the Service maps 443 to it).
pub const HTTPS_PORT: u16 = 8443;
/// Port of the FHIR server inside the pod; only the gateway talks to it.
pub const UPSTREAM_PORT: u16 = 8080;
/// Where nginx sends a copy of every access-log line (syslog over UDP on
/// loopback), for the gateway-metrics sidecar.
pub const SYSLOG_ADDRESS: &str = "127.0.0.1:5140";
/// Port of the gateway-metrics sidecar's Prometheus endpoint.
pub const METRICS_PORT: u16 = 9113;
/// Path the gateway answers `200 ok` on without an API key, not rate
/// limited and not logged: for the kubelet's probes (scheme HTTPS).
pub const HEALTH_PATH: &str = "/healthz";
/// Shortest API key [`api_keys_map`] accepts (the operator's keys are
/// 256-bit tokens: 64 hex or 43 base64url characters).
pub const MIN_API_KEY_LEN: usize = 32;
/// Longest API key [`api_keys_map`] accepts; the configuration sizes
/// nginx's map hash for it.
pub const MAX_API_KEY_LEN: usize = 128;

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
/// - `subject`: the bearer token's `sub` (empty for API keys)
/// - `jti`: the bearer token's `jti`, never the token itself
///
/// With the token verifier ([`GatewayAuth`]), `client` is the client it
/// authenticated (API key or token), also on a 403.
pub const ACCESS_LOG_FIELDS: [&str; 13] = [
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
    "subject",
    "jti",
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
    /// Host (IPv6 in brackets) and port of the endpoint's public URL: the
    /// FHIR server is told them in `X-Forwarded-Host` and
    /// `X-Forwarded-Port`, whatever a client sent.
    pub public_host: String,
    pub public_port: u16,
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
    /// The token verifier, when the endpoint has OAuth or client scopes.
    pub auth: Option<GatewayAuth>,
}

/// nginx asks the token verifier (`fhir-operator gateway-auth`) about every
/// request: API-key clients get their scopes checked, bearer tokens are
/// verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayAuth {
    /// The verifier's address, e.g. `127.0.0.1:9114`.
    pub verifier: String,
    /// The FHIR base path (`` or e.g. `/fhir`): the SMART configuration is
    /// served at `<base>/.well-known/smart-configuration`.
    pub base_path: String,
    /// The SMART configuration document's file, when there is one.
    pub smart_configuration: Option<String>,
}

/// Input the gateway cannot render. Messages name the setting or the
/// client id, never an API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// A [`GatewaySettings`] field nginx would misread or that would turn a
    /// safeguard off (a zero body size means "unlimited" to nginx).
    #[error("gateway setting {field} is invalid ({reason}): {value:?}")]
    InvalidSetting { field: &'static str, value: String, reason: &'static str },
    /// A client's API key is too short, too long, or holds a character
    /// outside `A-Z a-z 0-9 - _ . + / =`.
    #[error("the API key of client {client:?} cannot be used by the gateway: {reason}")]
    InvalidApiKey { client: String, reason: &'static str },
    /// A client id that is empty or holds a character outside
    /// `A-Z a-z 0-9 - _ .` (it is logged, passed upstream and used as a
    /// rate-limit key).
    #[error("client id {client:?} cannot be used by the gateway: it must be non-empty and only hold A-Z a-z 0-9 - _ .")]
    InvalidClientId { client: String },
    /// Two clients have the same key. nginx compares keys ignoring case, so
    /// keys that differ only in case count as the same.
    #[error("clients {first:?} and {second:?} have the same API key")]
    DuplicateApiKey { first: String, second: String },
}

/// The nginx variable behind each field of [`ACCESS_LOG_FIELDS`], in the
/// same order, and whether it is a JSON number (unquoted) or a string.
const ACCESS_LOG_VALUES: [(&str, bool); ACCESS_LOG_FIELDS.len()] = [
    ("$time_iso8601", false),
    ("$request_id", false),
    ("$client_id", false),
    ("$remote_addr", false),
    ("$request_method", false),
    ("$uri", false),
    ("$status", true),
    ("$request_time", true),
    ("$upstream_response_time", false),
    ("$body_bytes_sent", true),
    ("$ssl_protocol", false),
    ("", false),
    ("", false),
];

/// The log's client, subject and token id with the token verifier.
const VERIFIED_LOG_VALUES: [(&str, &str); 3] =
    [("client", "$auth_client"), ("subject", "$auth_subject"), ("jti", "$auth_jti")];

/// Seconds a client is told to wait after a 429. Rates are whole requests
/// per second, so a rejected client may send again within one second.
const RETRY_AFTER_SECONDS: u32 = 1;

/// Renders `nginx.conf`: a complete main configuration, valid for
/// `nginx -t -c FILE -g 'daemon off;'`. Fails on settings nginx would
/// misread or that would switch a limit off.
pub fn nginx_conf(settings: &GatewaySettings) -> Result<String, GatewayError> {
    validate(settings)?;
    Ok(render(settings))
}

/// Renders the API-key map file, included in the gateway's
/// `map $http_x_api_key $client_id` block: each key mapped to its client id,
/// one quoted pair per line, sorted by client id then key. It holds key
/// material and so only ever goes into a Secret. `keys` holds
/// (key, client id) pairs; a pair given twice is rendered once.
///
/// Refuses, naming the client id and never the key: keys shorter than
/// [`MIN_API_KEY_LEN`] or longer than [`MAX_API_KEY_LEN`], keys or client ids
/// with characters outside their sets (so nothing can end a string or a
/// directive, start a variable or a regular expression, or be read as one of
/// `map`'s keywords), and one key given to two clients.
pub fn api_keys_map(keys: &[(String, String)]) -> Result<String, GatewayError> {
    // nginx lowercases map keys, so two keys that differ only in case
    // would collide there: detect that here, keyed the same way.
    let mut by_key: BTreeMap<String, &str> = BTreeMap::new();
    for (key, client) in keys {
        check_client_id(client)?;
        check_api_key(key, client)?;
        if let Some(first) = by_key.insert(key.to_ascii_lowercase(), client)
            && first != client
        {
            return Err(GatewayError::DuplicateApiKey { first: first.to_owned(), second: client.clone() });
        }
    }
    let mut pairs: Vec<(&str, &str)> = keys.iter().map(|(key, client)| (client.as_str(), key.as_str())).collect();
    pairs.sort_unstable();
    pairs.dedup();
    let mut out = String::from(
        "# API key -> client id, for the gateway's `map $http_x_api_key $client_id`.\n\
         # Rendered by fhir-operator from the endpoint's key schedules.\n",
    );
    for (client, key) in pairs {
        out.push_str(&format!("\"{key}\" \"{client}\";\n"));
    }
    Ok(out)
}

// The messages below and the map's hash bucket size are written for these.
const _: () = assert!(MIN_API_KEY_LEN == 32 && MAX_API_KEY_LEN == 128);

fn check_api_key(key: &str, client: &str) -> Result<(), GatewayError> {
    let reason = if key.len() < MIN_API_KEY_LEN {
        "it is shorter than 32 characters"
    } else if key.len() > MAX_API_KEY_LEN {
        "it is longer than 128 characters"
    } else if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.+/=".contains(&b)) {
        "it holds a character outside A-Z a-z 0-9 - _ . + / ="
    } else {
        return Ok(());
    };
    Err(GatewayError::InvalidApiKey { client: client.to_owned(), reason })
}

fn check_client_id(client: &str) -> Result<(), GatewayError> {
    if !client.is_empty() && client.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        Ok(())
    } else {
        Err(GatewayError::InvalidClientId { client: client.to_owned() })
    }
}

/// Settings are rendered unquoted, so each must be one nginx word that
/// cannot end a directive, start a variable or a comment, or hold a quote.
fn validate(s: &GatewaySettings) -> Result<(), GatewayError> {
    let invalid =
        |field, value: &str, reason| Err(GatewayError::InvalidSetting { field, value: value.to_owned(), reason });
    let addresses = [
        ("public_host", Some(&s.public_host)),
        ("listen", Some(&s.listen)),
        ("upstream", Some(&s.upstream)),
        ("access_log_syslog", s.access_log_syslog.as_ref()),
        ("auth.verifier", s.auth.as_ref().map(|a| &a.verifier)),
    ];
    for (field, value) in addresses {
        let Some(value) = value else { continue };
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b".:[]_-".contains(&b)) {
            return invalid(field, value, "expected an address such as 127.0.0.1:8080 or a port");
        }
    }
    let paths = [
        ("tls_certificate", &s.tls_certificate),
        ("tls_certificate_key", &s.tls_certificate_key),
        ("api_keys_map", &s.api_keys_map),
        ("temp_dir", &s.temp_dir),
        ("access_log", &s.access_log),
    ];
    let auth_paths = s.auth.iter().flat_map(|a| {
        let smart = a.smart_configuration.as_ref().map(|f| ("auth.smart_configuration", f));
        smart.into_iter()
    });
    for (field, value) in paths.into_iter().chain(auth_paths) {
        // The key map may be a glob (one directory per key schedule): nginx
        // includes every match, and a glob matching nothing is no error.
        let glob = if field == "api_keys_map" { &b"*"[..] } else { &b""[..] };
        if !value.starts_with('/')
            || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b) || glob.contains(&b))
        {
            return invalid(field, value, "expected an absolute path of A-Z a-z 0-9 / . _ + -");
        }
    }
    if let Some(auth) = &s.auth {
        let base = &auth.base_path;
        let segments_ok = base.is_empty()
            || (base.starts_with('/')
                && base[1..].split('/').all(|seg| {
                    !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
                }));
        if !segments_ok {
            return invalid("auth.base_path", base, "expected empty or a path such as /fhir of A-Z a-z 0-9 - _");
        }
    }
    let limits = &s.limits;
    let rates =
        [("limits.default", Some(limits.default)), ("limits.read", limits.read), ("limits.write", limits.write)];
    for (field, rate) in rates {
        if let Some(rate) = rate
            && rate.per_second == 0
        {
            return invalid(field, "0", "per_second must be at least 1");
        }
    }
    // nginx reads 0 as "no limit" and its sizes are signed 64-bit.
    if limits.max_body_bytes == 0 || limits.max_body_bytes > i64::MAX as u64 {
        return invalid("limits.max_body_bytes", &limits.max_body_bytes.to_string(), "must be from 1 to 2^63-1");
    }
    Ok(())
}

/// A rate-limit zone: requests whose key is empty are not counted in it.
struct Zone {
    name: &'static str,
    key: &'static str,
    rate: Rate,
}

/// What the tier counts requests per, as an nginx variable.
fn counted_per(limits: &Limits, verified: bool) -> &'static str {
    match (limits.key, verified) {
        (LimitKey::Client, false) => "$client_id",
        (LimitKey::Client, true) => "$auth_client",
        (LimitKey::SourceIp, _) => "$binary_remote_addr",
    }
}

/// One zone for every request when the tier has no read/write split;
/// otherwise one per class, keyed by a variable that is empty for the other
/// class (see [`render_limit_zones`]), with the tier's default rate for a
/// class without its own.
fn zones(limits: &Limits, verified: bool) -> Vec<Zone> {
    if limits.read.is_none() && limits.write.is_none() {
        return vec![Zone { name: "fhir_requests", key: counted_per(limits, verified), rate: limits.default }];
    }
    vec![
        Zone { name: "fhir_reads", key: "$fhir_read_key", rate: limits.read.unwrap_or(limits.default) },
        Zone { name: "fhir_writes", key: "$fhir_write_key", rate: limits.write.unwrap_or(limits.default) },
    ]
}

/// A configuration file being written: lines indented by block depth.
#[derive(Default)]
struct Conf {
    out: String,
    depth: usize,
}

impl Conf {
    fn line(&mut self, text: impl AsRef<str>) {
        let text = text.as_ref();
        if !text.is_empty() {
            self.out.push_str(&"    ".repeat(self.depth));
            self.out.push_str(text);
        }
        self.out.push('\n');
    }

    /// `#` comment lines saying why; `text` may span several lines.
    fn comment(&mut self, text: &str) {
        for line in text.lines() {
            self.line(format!("# {line}").trim_end());
        }
    }

    fn block(&mut self, head: impl AsRef<str>, body: impl FnOnce(&mut Self)) {
        self.line(format!("{} {{", head.as_ref()));
        self.depth += 1;
        body(self);
        self.depth -= 1;
        self.line("}");
    }
}

fn render(s: &GatewaySettings) -> String {
    let temp = s.temp_dir.trim_end_matches('/');
    let mut c = Conf::default();
    c.comment(
        "The FHIR gateway, rendered by fhir-operator: edits are overwritten.\n\
         Runs unprivileged on a read-only root filesystem: nginx writes only\n\
         under the temp dir below. The container passes -g 'daemon off;'.",
    );
    c.line("worker_processes 1;");
    c.line(format!("pid {temp}/nginx.pid;"));
    c.comment(
        "crit, not error: nginx's request errors (limiting requests, too large\n\
         body, upstream failures) quote the request line, query string\n\
         included, and FHIR search parameters can carry patient data. Every\n\
         request, rejections included, is in the access log instead.",
    );
    c.line("error_log stderr crit;");
    c.line("");
    c.block("events", |c| c.line("worker_connections 1024;"));
    c.line("");
    c.block("http", |c| render_http(c, s, temp));
    c.out
}

fn render_http(c: &mut Conf, s: &GatewaySettings, temp: &str) {
    c.line("server_tokens off;");
    c.comment(
        "No MIME table: what nginx answers itself is FHIR JSON whatever the\n\
         path's extension; proxied responses keep the FHIR server's type.",
    );
    c.line("types {}");
    c.line("default_type application/fhir+json;");
    c.line("");
    for (directive, dir) in [
        ("client_body_temp_path", "client_body"),
        ("proxy_temp_path", "proxy"),
        ("fastcgi_temp_path", "fastcgi"),
        ("uwsgi_temp_path", "uwsgi"),
        ("scgi_temp_path", "scgi"),
    ] {
        c.line(format!("{directive} {temp}/{dir};"));
    }
    c.line(format!("client_max_body_size {};", s.limits.max_body_bytes));
    c.line("");
    c.comment(
        "The audit trail: one JSON object per request. The path is $uri,\n\
         never the query string (FHIR search parameters can carry patient data).",
    );
    // One quoted piece per field (nginx joins them): `"name":"$variable",`.
    c.line("log_format fhir_audit escape=json");
    c.depth += 1;
    for (i, (field, (variable, number))) in ACCESS_LOG_FIELDS.iter().zip(ACCESS_LOG_VALUES).enumerate() {
        let verified = VERIFIED_LOG_VALUES.iter().find(|(name, _)| name == field).map(|(_, v)| *v);
        let variable = match (&s.auth, verified) {
            (Some(_), Some(v)) => v,
            _ => variable,
        };
        let open = if i == 0 { "{" } else { "" };
        let close = if i + 1 == ACCESS_LOG_FIELDS.len() { "}';" } else { ",'" };
        let value = if number { variable.to_owned() } else { format!("\"{variable}\"") };
        c.line(format!("'{open}\"{field}\":{value}{close}"));
    }
    c.depth -= 1;
    c.line(format!("access_log {} fhir_audit;", s.access_log));
    if let Some(syslog) = &s.access_log_syslog {
        c.line(format!("access_log syslog:server={syslog},tag=fhir_gateway fhir_audit;"));
    }
    c.line("");
    c.comment(
        "API key -> client id. \"\" (no key, or one not in the map) gets 401.\n\
         The bucket size fits keys up to 128 characters.",
    );
    c.line("map_hash_bucket_size 256;");
    c.block("map $http_x_api_key $client_id", |c| {
        c.line("default \"\";");
        c.line(format!("include {};", s.api_keys_map));
    });
    c.line("");
    render_limit_zones(c, &s.limits, s.auth.is_some());
    c.line("");
    c.comment("Connections to the FHIR server are kept open between requests.");
    c.block("upstream fhir_server", |c| {
        c.line(format!("server {};", s.upstream));
        c.line("keepalive 16;");
    });
    if let Some(auth) = &s.auth {
        c.line("");
        c.comment("The token verifier (fhir-operator gateway-auth), on loopback.");
        c.block("upstream fhir_auth", |c| {
            c.line(format!("server {};", auth.verifier));
            c.line("keepalive 8;");
        });
    }
    c.line("");
    c.block("server", |c| render_server(c, s));
}

fn render_limit_zones(c: &mut Conf, limits: &Limits, verified: bool) {
    let zones = zones(limits, verified);
    if zones.len() > 1 {
        c.comment(
            "Reads and writes are limited apart: each zone's key is empty for\n\
             the other class, and nginx does not count requests with an empty\n\
             key. Methods other than GET, HEAD and OPTIONS count as writes.",
        );
        let counted = counted_per(limits, verified);
        for (variable, read, write) in [("$fhir_read_key", counted, "\"\""), ("$fhir_write_key", "\"\"", counted)] {
            c.block(format!("map $request_method {variable}"), |c| {
                for method in ["GET", "HEAD", "OPTIONS"] {
                    c.line(format!("{method} {read};"));
                }
                c.line(format!("default {write};"));
            });
        }
    }
    for zone in &zones {
        c.line(format!("limit_req_zone {} zone={}:10m rate={}r/s;", zone.key, zone.name, zone.rate.per_second));
    }
    c.line("limit_req_status 429;");
}

fn render_server(c: &mut Conf, s: &GatewaySettings) {
    c.line(format!("listen {} ssl;", s.listen));
    c.line(format!("ssl_certificate {};", s.tls_certificate));
    c.line(format!("ssl_certificate_key {};", s.tls_certificate_key));
    c.line("ssl_protocols TLSv1.3;");
    c.line("ssl_session_cache shared:fhir_tls:10m;");
    c.line("ssl_session_tickets off;");
    c.line("");
    c.comment(
        "X-Request-ID lets a client quote its access-log line. nginx drops\n\
         inherited add_header lines wherever a block has its own, so the\n\
         locations below that add a header repeat these.",
    );
    security_headers(c);
    c.line("");
    c.comment("Named locations keep $uri, so rejections are logged with the request's path.");
    c.line("error_page 401 @unauthorized;");
    if s.auth.is_some() {
        c.line("error_page 403 @forbidden;");
    }
    c.line("error_page 413 @too_large;");
    c.line("error_page 429 @rate_limited;");
    c.line("");
    c.comment("For the kubelet's probes: no key, no rate limit, not logged.");
    c.block(format!("location = {HEALTH_PATH}"), |c| {
        c.line("access_log off;");
        c.line("default_type text/plain;");
        c.line("return 200 \"ok\";");
    });
    if let Some(auth) = &s.auth {
        render_auth_locations(c, auth);
    }
    c.line("");
    match &s.auth {
        None => c.block("location /", |c| {
            c.comment("Runs before the rate limits: a request without a valid key costs no client's budget.");
            c.block("if ($client_id = \"\")", |c| c.line("return 401;"));
            proxy_to_server(c, s);
        }),
        Some(_) => {
            c.block("location /", |c| {
                c.comment(
                    "Every request is checked by the token verifier: an API key's\n\
                     client or a bearer token, and the scopes of either.",
                );
                c.line("auth_request /_fhir_auth;");
                for (variable, header) in AUTH_VARIABLES {
                    c.line(format!("auth_request_set ${variable} $upstream_http_{header};"));
                }
                c.comment(
                    "try_files runs after the verifier: the rate limits in @fhir count\n\
                     per authenticated client, and a refused request costs no budget\n\
                     and no limit-zone memory (the file never exists).",
                );
                c.line("try_files /.fhir-gateway-no-such-file @fhir;");
            });
            c.line("");
            c.block("location @fhir", |c| proxy_to_server(c, s));
        }
    }
    let too_large = format!("The request body is larger than {} bytes.", s.limits.max_body_bytes);
    let retry_after = format!("add_header Retry-After {RETRY_AFTER_SECONDS} always;");
    let verified = s.auth.is_some();
    let challenge = if verified {
        "add_header WWW-Authenticate $auth_challenge always;"
    } else {
        "add_header WWW-Authenticate 'ApiKey header=\"X-API-Key\"' always;"
    };
    let unauthorized = if verified { "$auth_reason" } else { "A valid X-API-Key header is required." };
    let mut pages = vec![("unauthorized", 401, challenge, "login", unauthorized)];
    if verified {
        pages.push(("forbidden", 403, challenge, "forbidden", "$auth_reason"));
    }
    pages.extend([
        ("too_large", 413, "", "too-long", too_large.as_str()),
        (
            "rate_limited",
            429,
            retry_after.as_str(),
            "throttled",
            "Rate limit exceeded: retry after Retry-After seconds.",
        ),
    ]);
    for (name, status, header, code, diagnostics) in pages {
        c.line("");
        c.block(format!("location @{name}"), |c| {
            if !header.is_empty() {
                security_headers(c);
                c.line(header);
            }
            c.line(format!(
                "return {status} '{{\"resourceType\":\"OperationOutcome\",\"issue\":[{{\"severity\":\"error\",\
                 \"code\":\"{code}\",\"diagnostics\":\"{diagnostics}\"}}]}}';"
            ));
        });
    }
}

/// Rate limits, then the FHIR server: headers replaced, credentials dropped.
fn proxy_to_server(c: &mut Conf, s: &GatewaySettings) {
    for zone in zones(&s.limits, s.auth.is_some()) {
        // Never burst=0: without a burst nginx keeps no credit for the
        // time between requests, so a client sending a little above the
        // rate is refused well below it (12/s against 10/s measured at
        // about 6/s). With burst 1 it admits the configured rate.
        let burst = zone.rate.burst.max(1);
        c.line(format!("limit_req zone={} burst={burst} nodelay;", zone.name));
    }
    c.line("proxy_pass http://fhir_server;");
    c.line("proxy_http_version 1.1;");
    c.line("proxy_set_header Connection \"\";");
    c.line("proxy_set_header Host $host;");
    c.comment(
        "The gateway is the edge: a client's own X-Forwarded-* and Forwarded\n\
         headers are replaced, never passed on. Host and port are the\n\
         endpoint's public URL, as the FHIR server is also told it.",
    );
    c.line("proxy_set_header X-Forwarded-For $remote_addr;");
    c.line("proxy_set_header X-Forwarded-Proto https;");
    c.line(format!("proxy_set_header X-Forwarded-Host {};", s.public_host));
    c.line(format!("proxy_set_header X-Forwarded-Port {};", s.public_port));
    c.line("proxy_set_header X-Forwarded-Prefix \"\";");
    c.line("proxy_set_header X-Forwarded-Server \"\";");
    c.line("proxy_set_header X-Real-IP \"\";");
    c.line("proxy_set_header Forwarded \"\";");
    c.line("proxy_set_header X-Request-ID $request_id;");
    match &s.auth {
        None => {
            c.line("proxy_set_header X-Client-ID $client_id;");
            c.line("proxy_set_header X-Client-Subject \"\";");
            c.line("proxy_set_header X-Client-Scopes \"\";");
        }
        Some(_) => {
            c.comment(
                "Who the verifier authenticated, and the scopes in force; a\n\
                 client's own headers of these names are replaced.",
            );
            c.line("proxy_set_header X-Client-ID $auth_client;");
            c.line("proxy_set_header X-Client-Subject $auth_subject;");
            c.line("proxy_set_header X-Client-Scopes $auth_scopes;");
        }
    }
    c.comment("The FHIR server never sees API keys or bearer tokens.");
    c.line("proxy_set_header X-API-Key \"\";");
    c.line("proxy_set_header Authorization \"\";");
    c.line("proxy_hide_header X-Powered-By;");
}

/// nginx variables the verifier's answer headers are read into.
const AUTH_VARIABLES: [(&str, &str); 6] = [
    ("auth_client", "x_auth_client"),
    ("auth_subject", "x_auth_subject"),
    ("auth_scopes", "x_auth_scopes"),
    ("auth_jti", "x_auth_jti"),
    ("auth_challenge", "x_auth_challenge"),
    ("auth_reason", "x_auth_reason"),
];

fn render_auth_locations(c: &mut Conf, auth: &GatewayAuth) {
    if let Some(file) = &auth.smart_configuration {
        c.line("");
        c.comment("SMART discovery: public, like the token endpoint it names.");
        c.block(format!("location = {}/.well-known/smart-configuration", auth.base_path), |c| {
            c.line("default_type application/json;");
            security_headers(c);
            c.line(format!("alias {file};"));
        });
    }
    c.line("");
    c.comment(
        "The verifier's question: method, raw URI, the API key's client and\n\
         the Authorization header, nothing else (no body, no other header).\n\
         Its answer is never logged: the token is in the question.",
    );
    c.block("location = /_fhir_auth", |c| {
        c.line("internal;");
        c.line("access_log off;");
        c.line("proxy_pass http://fhir_auth/check;");
        c.line("proxy_http_version 1.1;");
        c.line("proxy_pass_request_body off;");
        c.line("proxy_pass_request_headers off;");
        c.line("proxy_set_header Connection \"\";");
        c.line("proxy_set_header Content-Length \"\";");
        c.line("proxy_set_header X-Original-Method $request_method;");
        c.line("proxy_set_header X-Original-URI $request_uri;");
        c.line("proxy_set_header X-Api-Client $client_id;");
        c.line("proxy_set_header Authorization $http_authorization;");
    });
}

fn security_headers(c: &mut Conf) {
    c.line("add_header Strict-Transport-Security \"max-age=31536000\" always;");
    c.line("add_header X-Content-Type-Options nosniff always;");
    c.line("add_header X-Request-ID $request_id always;");
}
