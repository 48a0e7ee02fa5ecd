//! One audit record per gateway request, shaped after IHE Basic Audit Log
//! Patterns (a FHIR AuditEvent's when, outcome, action, entity and agent),
//! built from one line of nginx's JSON access log.
//!
//! What a record never holds: the query string and the body (FHIR search
//! parameters and resources carry PHI; nginx logs `$uri` only), an API key
//! or a token (the gateway logs the client id the key maps to, and a
//! token's `jti` and subject, never the token). The path itself is not
//! kept either: what it says is kept as interaction, resource type, id,
//! operation and patient, each checked against FHIR's syntax, so arbitrary
//! text a client puts in a URL does not reach the trail.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// One line of the gateway's access log: the fields of
/// `gateway::ACCESS_LOG_FIELDS`, and those a gateway with OAuth adds
/// (`subject`, `jti`, `scopes`, `auth_error`). Every field but `status` may
/// be missing (empty).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct AccessLine {
    pub time: String,
    pub request_id: String,
    pub client: String,
    pub remote_addr: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub request_time: f64,
    pub subject: String,
    pub jti: String,
    pub scopes: String,
    pub auth_error: String,
}

/// The FHIR interaction a request was, from its method and path
/// (FHIR RESTful API; `Other` for what is none of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interaction {
    Read,
    Vread,
    Search,
    Create,
    Update,
    Patch,
    Delete,
    History,
    Operation,
    Batch,
    Capabilities,
    Other,
}

impl Interaction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Vread => "vread",
            Self::Search => "search",
            Self::Create => "create",
            Self::Update => "update",
            Self::Patch => "patch",
            Self::Delete => "delete",
            Self::History => "history",
            Self::Operation => "operation",
            Self::Batch => "batch",
            Self::Capabilities => "capabilities",
            Self::Other => "other",
        }
    }
}

/// A resource type as FHIR spells them: an upper-case letter, then letters.
fn is_resource_type(segment: &str) -> bool {
    let mut bytes = segment.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase())
        && segment.len() <= 64
        && bytes.all(|b| b.is_ascii_alphabetic())
}

/// A logical id as FHIR allows them: `[A-Za-z0-9\-\.]{1,64}`.
fn is_id(segment: &str) -> bool {
    (1..=64).contains(&segment.len()) && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn is_operation(segment: &str) -> bool {
    segment.strip_prefix('$').is_some_and(|name| {
        (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The FHIR part of a path: what follows the server's base path (`/fhir`,
/// `/fhir/R4` or nothing), found as the first segment that is a resource
/// type, an operation, `metadata`, `_history` or `_search`.
fn fhir_segments(path: &str) -> Vec<&str> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let start = segments
        .iter()
        .position(|s| is_resource_type(s) || is_operation(s) || matches!(*s, "metadata" | "_history" | "_search"))
        .unwrap_or(segments.len());
    segments[start..].to_vec()
}

/// Classifies a request by its method and path (`$uri`, no query string):
/// the interaction, the resource type and the resource's logical id where
/// the path names them. Pure; a path that is none of FHIR's shapes is
/// `Other`, and only FHIR-shaped types and ids are returned.
pub fn interaction(method: &str, path: &str) -> (Interaction, Option<String>, Option<String>) {
    use Interaction::*;
    let read = matches!(method, "GET" | "HEAD");
    let segments = fhir_segments(path);
    let owned = |s: &str| Some(s.to_owned());
    match segments.as_slice() {
        [] if method == "POST" => (Batch, None, None),
        [] if read => (Search, None, None),
        ["metadata"] if read => (Capabilities, None, None),
        ["_history"] if read => (History, None, None),
        ["_search"] if method == "POST" => (Search, None, None),
        [op, ..] if is_operation(op) => (Operation, None, None),
        [t] if is_resource_type(t) => match method {
            "GET" | "HEAD" => (Search, owned(t), None),
            "POST" => (Create, owned(t), None),
            // Conditional update, patch and delete: the criteria are in the
            // query string, which is not logged.
            "PUT" => (Update, owned(t), None),
            "PATCH" => (Patch, owned(t), None),
            "DELETE" => (Delete, owned(t), None),
            _ => (Other, owned(t), None),
        },
        [t, "_search"] if is_resource_type(t) && (read || method == "POST") => (Search, owned(t), None),
        [t, "_history"] if is_resource_type(t) && read => (History, owned(t), None),
        [t, op, ..] if is_resource_type(t) && is_operation(op) => (Operation, owned(t), None),
        [t, id] if is_resource_type(t) && is_id(id) => match method {
            "GET" | "HEAD" => (Read, owned(t), owned(id)),
            "PUT" => (Update, owned(t), owned(id)),
            "PATCH" => (Patch, owned(t), owned(id)),
            "DELETE" => (Delete, owned(t), owned(id)),
            _ => (Other, owned(t), owned(id)),
        },
        [t, id, "_history"] if is_resource_type(t) && is_id(id) && read => (History, owned(t), owned(id)),
        [t, id, "_history", v] if is_resource_type(t) && is_id(id) && is_id(v) && read => (Vread, owned(t), owned(id)),
        [t, id, op, ..] if is_resource_type(t) && is_id(id) && is_operation(op) => (Operation, owned(t), owned(id)),
        // A compartment search, `Patient/123/Observation`: the type searched.
        [t, id, c] if is_resource_type(t) && is_id(id) && is_resource_type(c) && read => (Search, owned(c), None),
        _ => (Other, None, None),
    }
}

/// The patient a path names: `Patient/<id>` and anything below it (read,
/// history, `$everything`, compartment searches).
pub fn patient_id(path: &str) -> Option<String> {
    match fhir_segments(path).as_slice() {
        ["Patient", id, ..] if is_id(id) => Some((*id).to_owned()),
        _ => None,
    }
}

/// The operation a path invokes (`$everything`), without the `$`.
fn operation(path: &str) -> Option<String> {
    fhir_segments(path).into_iter().find(|s| is_operation(s)).map(|s| s[1..].to_owned())
}

/// One audit record, as a line of a segment. `seq` and `prev` chain it
/// (see `chain`); the rest says what happened. Field order is the
/// canonical order: a record's bytes are exactly `serde_json::to_vec` of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Position in the stream's chain, from 1, without gaps.
    pub seq: u64,
    /// SHA-256 (hex) of the previous record's line; 64 zeros for the first.
    pub prev: String,
    /// When nginx logged the request, UTC, RFC 3339.
    pub time: String,
    /// The HTTP status answered (0: the access-log line could not be read).
    pub outcome: u16,
    pub interaction: Interaction,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operation: String,
    /// The patient the URL names (`Patient/<id>...`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub patient: String,
    /// The API key's or the OAuth token's client id; empty without one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client: String,
    /// The token's subject and `jti`, when the request carried a token.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    /// Why the gateway refused the credentials (a reason, never a value).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub auth_error: String,
    /// The peer's address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// nginx's `$request_id`, also sent to the client as `X-Request-ID`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// Set when the log line could not be read: the request is still
    /// counted, its details are not known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// RFC 3339 in UTC with whole seconds (what nginx's `$time_iso8601` has).
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}

/// Keeps a logged value only when it is short and printable: the fields
/// come from nginx variables a client can influence.
fn bounded(value: &str, max: usize) -> String {
    if value.len() <= max && value.chars().all(|c| !c.is_control()) { value.to_owned() } else { String::new() }
}

impl Record {
    /// The record of one access-log line, before it is chained (`seq` 0,
    /// `prev` empty). A line that does not parse still makes a record, with
    /// outcome 0, `error` set and `fallback_time` as its time: the trail
    /// counts every line nginx wrote, and never copies an unread line.
    pub fn from_log_line(line: &[u8], fallback_time: &str) -> Record {
        let parsed = serde_json::from_slice::<AccessLine>(line)
            .ok()
            .and_then(|access| parse_time(&access.time).map(|time| (access, time)));
        let Some((access, time)) = parsed else {
            return Record {
                seq: 0,
                prev: String::new(),
                time: fallback_time.to_owned(),
                outcome: 0,
                interaction: Interaction::Other,
                method: String::new(),
                resource_type: String::new(),
                resource_id: String::new(),
                operation: String::new(),
                patient: String::new(),
                client: String::new(),
                subject: String::new(),
                jti: String::new(),
                auth_error: String::new(),
                source: String::new(),
                request_id: String::new(),
                error: "unreadable access-log line".into(),
            };
        };
        Record::from_access(&access, time)
    }

    pub fn from_access(access: &AccessLine, time: DateTime<Utc>) -> Record {
        let (interaction, resource_type, resource_id) = interaction(&access.method, &access.path);
        let method = if access.method.len() <= 16 && access.method.bytes().all(|b| b.is_ascii_uppercase()) {
            access.method.clone()
        } else {
            String::new()
        };
        Record {
            seq: 0,
            prev: String::new(),
            time: format_time(time),
            outcome: access.status,
            interaction,
            method,
            resource_type: resource_type.unwrap_or_default(),
            resource_id: resource_id.unwrap_or_default(),
            operation: operation(&access.path).unwrap_or_default(),
            patient: patient_id(&access.path).unwrap_or_default(),
            client: bounded(&access.client, 128),
            subject: bounded(&access.subject, 256),
            jti: bounded(&access.jti, 256),
            auth_error: bounded(&access.auth_error, 128),
            source: bounded(&access.remote_addr, 64),
            request_id: bounded(&access.request_id, 64),
            error: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Interaction::*;
    use super::*;

    #[test]
    fn classifies_every_interaction() {
        let cases = [
            ("GET", "/fhir/Patient/123", Read, Some("Patient"), Some("123")),
            ("HEAD", "/Patient/123", Read, Some("Patient"), Some("123")),
            ("GET", "/fhir/Patient/123/_history/2", Vread, Some("Patient"), Some("123")),
            ("GET", "/fhir/Observation", Search, Some("Observation"), None),
            ("POST", "/fhir/Observation/_search", Search, Some("Observation"), None),
            ("GET", "/fhir/Patient/123/Observation", Search, Some("Observation"), None),
            ("GET", "/fhir", Search, None, None),
            ("POST", "/fhir/Observation", Create, Some("Observation"), None),
            ("PUT", "/fhir/Observation/o-1", Update, Some("Observation"), Some("o-1")),
            ("PUT", "/fhir/Observation", Update, Some("Observation"), None),
            ("PATCH", "/fhir/Observation/o-1", Patch, Some("Observation"), Some("o-1")),
            ("DELETE", "/fhir/Observation/o-1", Delete, Some("Observation"), Some("o-1")),
            ("GET", "/fhir/Patient/123/_history", History, Some("Patient"), Some("123")),
            ("GET", "/fhir/Patient/_history", History, Some("Patient"), None),
            ("GET", "/fhir/_history", History, None, None),
            ("GET", "/fhir/Patient/123/$everything", Operation, Some("Patient"), Some("123")),
            ("POST", "/fhir/$export", Operation, None, None),
            ("GET", "/fhir/Patient/$match", Operation, Some("Patient"), None),
            ("POST", "/fhir", Batch, None, None),
            ("POST", "/fhir/", Batch, None, None),
            ("GET", "/fhir/metadata", Capabilities, None, None),
            ("GET", "/fhir/R4/metadata", Capabilities, None, None),
            ("GET", "/metadata", Capabilities, None, None),
            ("GET", "/fhir/Patient/<script>", Other, None, None),
            ("BREW", "/fhir/Patient/1", Other, Some("Patient"), Some("1")),
            ("DELETE", "/fhir/metadata", Other, None, None),
        ];
        for (method, path, want, resource_type, id) in cases {
            let got = interaction(method, path);
            assert_eq!(got, (want, resource_type.map(str::to_owned), id.map(str::to_owned)), "{method} {path}");
        }
    }

    #[test]
    fn patient_only_from_a_patient_path() {
        assert_eq!(patient_id("/fhir/Patient/p-7").as_deref(), Some("p-7"));
        assert_eq!(patient_id("/fhir/Patient/p-7/$everything").as_deref(), Some("p-7"));
        assert_eq!(patient_id("/fhir/Patient/p-7/Observation").as_deref(), Some("p-7"));
        assert_eq!(patient_id("/fhir/Patient/_search"), None);
        assert_eq!(patient_id("/fhir/Patient/$match"), None);
        assert_eq!(patient_id("/fhir/Observation/p-7"), None);
        assert_eq!(patient_id(&format!("/fhir/Patient/{}", "x".repeat(65))), None);
    }

    #[test]
    fn a_log_line_becomes_a_record_with_optional_fields() {
        let line = br#"{"time":"2025-03-07T10:05:01+01:00","request_id":"4f1c","client":"billing","remote_addr":"10.0.0.7","method":"GET","path":"/fhir/Patient/p-1/$everything","status":200,"request_time":0.042,"upstream_time":"0.040","bytes_sent":512,"tls_protocol":"TLSv1.3","jti":"t-9","subject":"dr-who","scopes":"patient/*.rs"}"#;
        let record = Record::from_log_line(line, "unused");
        assert_eq!(record.time, "2025-03-07T09:05:01Z");
        assert_eq!((record.outcome, record.interaction), (200, Operation));
        assert_eq!((record.resource_type.as_str(), record.resource_id.as_str()), ("Patient", "p-1"));
        assert_eq!((record.operation.as_str(), record.patient.as_str()), ("everything", "p-1"));
        assert_eq!(
            (record.client.as_str(), record.subject.as_str(), record.jti.as_str()),
            ("billing", "dr-who", "t-9")
        );
        assert_eq!((record.source.as_str(), record.request_id.as_str()), ("10.0.0.7", "4f1c"));
        let text = serde_json::to_string(&record).expect("encodes");
        assert!(!text.contains("auth_error") && !text.contains("scopes"), "{text}");
        let old =
            br#"{"time":"2025-03-07T09:05:01+00:00","client":"","method":"GET","path":"/fhir/metadata","status":401}"#;
        let record = Record::from_log_line(old, "unused");
        assert_eq!((record.outcome, record.interaction, record.client.as_str()), (401, Capabilities, ""));
    }

    #[test]
    fn an_unreadable_line_is_counted_but_not_copied() {
        for line in [&b"not json PHI-123"[..], br#"{"status":200,"time":"yesterday"}"#, b"\xff"] {
            let record = Record::from_log_line(line, "2025-03-07T09:05:01Z");
            assert_eq!((record.outcome, record.time.as_str()), (0, "2025-03-07T09:05:01Z"));
            assert!(!record.error.is_empty());
            assert!(!serde_json::to_string(&record).expect("encodes").contains("PHI"));
        }
    }

    #[test]
    fn client_controlled_values_are_bounded() {
        let access = AccessLine {
            time: "2025-03-07T09:05:01Z".into(),
            client: "a\nb".into(),
            request_id: "r".repeat(65),
            method: "get".into(),
            status: 400,
            ..AccessLine::default()
        };
        let record = Record::from_access(&access, Utc::now());
        assert_eq!((record.client.as_str(), record.request_id.as_str(), record.method.as_str()), ("", "", ""));
    }
}
