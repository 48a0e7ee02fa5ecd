//! `status.compliance`: one entry per HIPAA Security Rule technical
//! safeguard (45 CFR 164.312), each with a status, a reason and the names
//! of the objects that prove it. Pure: the reconciler gathers the facts.

use k8s_openapi::jiff::Timestamp;

use super::database::Applied;
use super::tls::CertInfo;
use super::validate::Validated;
use crate::api::{ComplianceCheck, ComplianceEntry, ComplianceStatus};

/// What the reconciler found out about the gateway's certificate.
#[derive(Debug, Clone)]
pub enum TlsFact {
    Certificate {
        secret: String,
        info: CertInfo,
    },
    /// The Secret is missing or holds no readable certificate.
    Unusable {
        secret: String,
        reason: String,
    },
}

/// A KeyRotationSchedule the endpoint uses.
#[derive(Debug, Clone)]
pub struct KeyScheduleFact {
    pub name: String,
    pub found: bool,
    pub suspended: bool,
    /// The schedule's own verdict (its `Ready` condition), when it has one.
    pub rotating: Option<bool>,
    /// When its last rotation was due and did not happen, if it is overdue.
    pub overdue_since: Option<Timestamp>,
}

/// The backup record for the endpoint.
#[derive(Debug, Clone)]
pub enum BackupFact {
    NoPolicy,
    /// `current`: whether the last successful backup is within twice the
    /// schedule's interval; `None` while nothing has finished (or a first
    /// backup runs). `restore_verified`: a restore drill verified a backup
    /// within the drill's interval.
    Policy {
        name: String,
        last_success: Option<Timestamp>,
        current: Option<bool>,
        restore_verified: bool,
    },
}

/// Facts the compliance checks read.
#[derive(Debug, Clone)]
pub struct Facts {
    pub now: Timestamp,
    pub tls: TlsFact,
    /// The NetworkPolicy applied for the endpoint.
    pub network_policy: Option<String>,
    /// The ConfigMap holding the gateway configuration (with its JSON access log).
    pub gateway_config: String,
    pub key_schedules: Vec<KeyScheduleFact>,
    pub backup: BackupFact,
    /// For an external database: whether its credentials Secret exists with
    /// `username` and `password` (Err says what is wrong).
    pub database_credentials: Option<Result<(), String>>,
    /// The Deployment that was applied, and the database connection read
    /// back from it (`None`: the embedded database).
    pub deployment: String,
    pub database: Option<Applied>,
    /// With `spec.database.caSecret`: whether that Secret exists with
    /// `ca.crt` (Err says what is wrong).
    pub database_ca: Option<Result<(), String>>,
    /// The token verifier's configuration as applied in the gateway's
    /// ConfigMap, and whether the applied Deployment runs the verifier
    /// (`None`: no verifier configured, API keys only).
    pub access: Option<AccessFact>,
    /// The audit trail: `None` without `spec.audit`.
    pub audit: Option<AuditFact>,
}

/// The audit trail as the operator last verified it.
#[derive(Debug, Clone)]
pub struct AuditFact {
    pub destination: String,
    pub key_secret: String,
    pub key_id: String,
    pub seal_every: std::time::Duration,
    pub verified_at: Timestamp,
    pub verification: super::audit_check::Verification,
}

/// What the applied gateway enforces about clients.
#[derive(Debug, Clone)]
pub struct AccessFact {
    /// Scopes per client from the applied `auth.json`; `None` when it has
    /// no client list (tokens' scopes alone decide).
    pub clients: Option<Vec<(String, Vec<String>)>>,
    /// The applied Deployment has the `gateway-auth` container.
    pub verifier_deployed: bool,
}

/// Reasons of the `tls` entry about the database connection.
pub mod reasons {
    /// verify-ca/verify-full without a CA: the server cannot be verified,
    /// so the connection cannot be made.
    pub const DATABASE_CA_MISSING: &str = "DatabaseCaMissing";
    /// The CA Secret is missing or has no `ca.crt`.
    pub const DATABASE_CA_UNUSABLE: &str = "DatabaseCaUnusable";
    /// The server's database driver cannot use TLS (hfs 0.2.7).
    pub const DATABASE_TLS_UNSUPPORTED: &str = "DatabaseTlsUnsupported";
    pub const DATABASE_NOT_VERIFIED: &str = "DatabaseNotVerified";
}

fn entry(
    name: ComplianceCheck,
    status: ComplianceStatus,
    reason: &str,
    message: impl Into<String>,
    evidence: Vec<String>,
) -> ComplianceEntry {
    let safeguard = match name {
        ComplianceCheck::Tls => "164.312(e)(1)",
        ComplianceCheck::NetworkIsolation => "164.312(a)(1)",
        ComplianceCheck::KeyRotation => "164.312(d)",
        ComplianceCheck::Backup => "164.312(c)(1)",
        ComplianceCheck::AuditLog => "164.312(b)",
        ComplianceCheck::Database => "164.312(a)(2)(iv)",
        ComplianceCheck::AccessControl => "164.312(a)(1), 164.312(d)",
    };
    ComplianceEntry {
        name,
        safeguard: safeguard.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        evidence,
    }
}

use ComplianceStatus::{Fail, Pass, Unknown};

/// Every compliance entry, in a fixed order.
pub fn evaluate(v: &Validated<'_>, facts: &Facts) -> Vec<ComplianceEntry> {
    let ns = &v.namespace;
    vec![
        tls(v, facts),
        match &facts.network_policy {
            Some(np) => entry(
                ComplianceCheck::NetworkIsolation,
                Pass,
                "DefaultDeny",
                "ingress and egress denied except clients, monitoring, DNS and the database",
                vec![format!("NetworkPolicy/{ns}/{np}")],
            ),
            None => entry(
                ComplianceCheck::NetworkIsolation,
                Fail,
                "NoNetworkPolicy",
                "the NetworkPolicy is not in place yet",
                vec![],
            ),
        },
        key_rotation(ns, facts),
        backup(ns, facts),
        audit_log(ns, facts),
        database(v, facts),
        access_control(ns, facts),
    ]
}

/// `auditLog`: the trail at its destination verified by the operator, and
/// its newest checkpoint younger than twice `sealEvery`.
fn audit_log(ns: &str, facts: &Facts) -> ComplianceEntry {
    use super::audit_check::Verification;
    let name = ComplianceCheck::AuditLog;
    let Some(audit) = &facts.audit else {
        return entry(
            name,
            Fail,
            "NoAuditTrail",
            "requests are only in the gateway's stdout log, kept as long as the node keeps it: set spec.audit",
            vec![format!("ConfigMap/{ns}/{}", facts.gateway_config)],
        );
    };
    let mut evidence = vec![
        format!("destination {}", audit.destination),
        format!("Secret/{ns}/{} (Ed25519 key {})", audit.key_secret, audit.key_id),
    ];
    if !matches!(audit.verification, Verification::Pending(_)) {
        evidence.push(format!("verified at {}", audit.verified_at));
    }
    match &audit.verification {
        Verification::Pending(why) => entry(name, Unknown, "VerificationPending", why.clone(), evidence),
        Verification::NotVerifiable(why) => entry(name, Unknown, "NotVerifiableByOperator", why.clone(), evidence),
        Verification::Unreadable(why) => entry(name, Fail, "DestinationUnreadable", why.clone(), evidence),
        Verification::Verified { problem: Some(problem), .. } => {
            entry(name, Fail, "AuditTrailBroken", problem.clone(), evidence)
        }
        Verification::Verified { last_seal: None, .. } => {
            entry(name, Unknown, "NoCheckpointYet", "no checkpoint has been written yet", evidence)
        }
        Verification::Verified { last_seal: Some(last), records, streams, problem: None } => {
            evidence.push(format!("last checkpoint {last}"));
            evidence.push(format!("{records} records in {streams} streams"));
            let limit = audit.seal_every * 2;
            let age = audit.verified_at.duration_since(*last);
            if age.as_secs_f64() > limit.as_secs_f64() {
                entry(
                    name,
                    Fail,
                    "CheckpointStale",
                    format!("the newest checkpoint is older than twice sealEvery ({}s)", limit.as_secs()),
                    evidence,
                )
            } else {
                entry(
                    name,
                    Pass,
                    "AuditTrailVerified",
                    "every signature, hash and link of the trail verified",
                    evidence,
                )
            }
        }
    }
}

/// `accessControl`: every client scoped, and no client able to write every
/// resource type. Read from the applied ConfigMap and Deployment.
fn access_control(ns: &str, facts: &Facts) -> ComplianceEntry {
    let name = ComplianceCheck::AccessControl;
    let Some(access) = &facts.access else {
        return entry(
            name,
            Fail,
            "NoClientScopes",
            "every valid API key grants every interaction on every resource type: list spec.auth.clients with their scopes",
            vec![format!("ConfigMap/{ns}/{}", facts.gateway_config)],
        );
    };
    let mut evidence = vec![format!("ConfigMap/{ns}/{} auth.json", facts.gateway_config)];
    if !access.verifier_deployed {
        return entry(
            name,
            Fail,
            "VerifierNotDeployed",
            "the gateway's token verifier is not in the applied Deployment",
            evidence,
        );
    }
    evidence.push(format!("Deployment/{ns}/{} container gateway-auth", facts.deployment));
    let Some(clients) = &access.clients else {
        return entry(
            name,
            Fail,
            "ClientsNotScoped",
            "any client with a valid token gets what its token's scopes say: list spec.auth.clients to bound them",
            evidence,
        );
    };
    let mut wildcard_writers = Vec::new();
    for (client, scopes) in clients {
        evidence.push(format!("client {client}: {}", scopes.join(" ")));
        let parsed = scopes.iter().filter_map(|s| crate::smart::Scope::parse(s).ok());
        if parsed.clone().any(|s| s.is_wildcard_write()) {
            wildcard_writers.push(client.clone());
        }
    }
    if !wildcard_writers.is_empty() {
        return entry(
            name,
            Fail,
            "WildcardWriteScope",
            format!(
                "clients {} may create, update or delete every resource type (system/*.c, .u or .d): grant writes per type",
                wildcard_writers.join(", ")
            ),
            evidence,
        );
    }
    entry(name, Pass, "ClientsScoped", format!("{} clients, each limited to its scopes", clients.len()), evidence)
}

fn tls(v: &Validated<'_>, facts: &Facts) -> ComplianceEntry {
    let ns = &v.namespace;
    let (secret, info) = match &facts.tls {
        TlsFact::Certificate { secret, info } => (secret, info),
        TlsFact::Unusable { secret, reason } => {
            return entry(
                ComplianceCheck::Tls,
                Fail,
                "CertificateUnusable",
                reason.clone(),
                vec![format!("Secret/{ns}/{secret}")],
            );
        }
    };
    let mut evidence = vec![format!("Secret/{ns}/{secret}"), format!("ConfigMap/{ns}/{}", facts.gateway_config)];
    if !info.valid_at(facts.now) {
        return entry(
            ComplianceCheck::Tls,
            Fail,
            "CertificateExpired",
            format!("the gateway certificate is valid from {} to {}", info.not_before, info.not_after),
            evidence,
        );
    }
    if let Some((reason, message)) = database_tls(v, facts, &mut evidence) {
        return entry(ComplianceCheck::Tls, Fail, reason, message, evidence);
    }
    entry(
        ComplianceCheck::Tls,
        Pass,
        "Tls13Only",
        format!("the gateway accepts TLS 1.3 only; certificate valid until {}", info.not_after),
        evidence,
    )
}

/// Why the database connection, as applied, is not verified TLS; adds the
/// settings that show it to `evidence`.
fn database_tls(v: &Validated<'_>, facts: &Facts, evidence: &mut Vec<String>) -> Option<(&'static str, String)> {
    let ns = &v.namespace;
    let applied = facts.database.as_ref()?;
    let t = &applied.target;
    evidence.push(format!("Deployment/{ns}/{}:env {} sslmode={}", facts.deployment, applied.setting, t.ssl_mode));
    if !applied.tls_capable {
        return Some((
            reasons::DATABASE_TLS_UNSUPPORTED,
            "the FHIR server (flavor helios, hfs 0.2.7) connects to PostgreSQL without TLS whatever \
             spec.database.sslMode says; use flavor hapi for a verified connection"
                .into(),
        ));
    }
    if !matches!(t.ssl_mode.as_str(), "verify-full" | "verify-ca") {
        return Some((
            reasons::DATABASE_NOT_VERIFIED,
            format!(
                "the database connection uses sslmode {}: it does not verify the server's certificate \
                 (set spec.database.sslMode to verify-full or verify-ca)",
                t.ssl_mode
            ),
        ));
    }
    let Some(ca) = &applied.ca else {
        return Some((
            reasons::DATABASE_CA_MISSING,
            format!(
                "sslmode {} needs a CA to verify the database server and none is mounted: the connection \
                 cannot be made. Set spec.database.caSecret to a Secret with key ca.crt",
                t.ssl_mode
            ),
        ));
    };
    evidence.push(format!("Secret/{ns}/{}:{}", ca.secret, ca.key));
    match &facts.database_ca {
        Some(Err(reason)) => Some((reasons::DATABASE_CA_UNUSABLE, reason.clone())),
        _ => None,
    }
}

fn key_rotation(ns: &str, facts: &Facts) -> ComplianceEntry {
    let evidence: Vec<String> =
        facts.key_schedules.iter().map(|k| format!("KeyRotationSchedule/{ns}/{}", k.name)).collect();
    if facts.key_schedules.is_empty() {
        return entry(
            ComplianceCheck::KeyRotation,
            Fail,
            "NoKeySchedules",
            "spec.auth.apiKeys names no KeyRotationSchedule: no client can authenticate",
            evidence,
        );
    }
    for k in &facts.key_schedules {
        let (reason, message) = if !k.found {
            ("KeyScheduleNotFound", format!("KeyRotationSchedule {} does not exist", k.name))
        } else if k.suspended {
            ("KeyScheduleSuspended", format!("KeyRotationSchedule {} is suspended", k.name))
        } else if let Some(since) = k.overdue_since {
            ("RotationOverdue", format!("KeyRotationSchedule {} has not rotated since {since}", k.name))
        } else if k.rotating == Some(false) {
            ("KeyScheduleNotReady", format!("KeyRotationSchedule {} is not Ready", k.name))
        } else {
            continue;
        };
        return entry(ComplianceCheck::KeyRotation, Fail, reason, message, evidence);
    }
    if facts.key_schedules.iter().any(|k| k.rotating.is_none()) {
        return entry(
            ComplianceCheck::KeyRotation,
            Unknown,
            "NotYetMeasured",
            "a key schedule has not reported yet",
            evidence,
        );
    }
    entry(ComplianceCheck::KeyRotation, Pass, "RotatingOnSchedule", "every key schedule rotates on time", evidence)
}

fn backup(ns: &str, facts: &Facts) -> ComplianceEntry {
    match &facts.backup {
        BackupFact::NoPolicy => {
            entry(ComplianceCheck::Backup, Fail, "NoBackupPolicy", "no BackupPolicy names this endpoint", vec![])
        }
        BackupFact::Policy { name, last_success, current, restore_verified } => {
            let evidence = vec![format!("BackupPolicy/{ns}/{name}")];
            match (current, last_success) {
                (None, _) => {
                    entry(ComplianceCheck::Backup, Unknown, "NotYetMeasured", "no backup has completed yet", evidence)
                }
                (Some(_), None) => entry(
                    ComplianceCheck::Backup,
                    Fail,
                    "NoSuccessfulBackup",
                    "no backup has succeeded yet; the last one failed",
                    evidence,
                ),
                (Some(false), Some(t)) => entry(
                    ComplianceCheck::Backup,
                    Fail,
                    "BackupStale",
                    format!("last successful backup {t} is older than twice the schedule interval"),
                    evidence,
                ),
                (Some(true), Some(_)) if !restore_verified => entry(
                    ComplianceCheck::Backup,
                    Fail,
                    "RestoreNotVerified",
                    "no restore drill verified a backup within its interval",
                    evidence,
                ),
                (Some(true), Some(t)) => entry(
                    ComplianceCheck::Backup,
                    Pass,
                    "BackupCurrent",
                    format!("last successful backup {t}, restore verified"),
                    evidence,
                ),
            }
        }
    }
}

fn database(v: &Validated<'_>, facts: &Facts) -> ComplianceEntry {
    let ns = &v.namespace;
    let Some(applied) = &facts.database else {
        return entry(
            ComplianceCheck::Database,
            Fail,
            "EmbeddedDatabase",
            "the FHIR server uses its embedded database: not production-ready (data lives only as long as the pod)",
            vec![format!("Deployment/{ns}/{}", facts.deployment)],
        );
    };
    let t = &applied.target;
    let mut evidence = vec![format!("Deployment/{ns}/{}:env {}", facts.deployment, applied.setting)];
    if let Some(db) = &v.database {
        evidence.push(format!("Secret/{ns}/{}", db.credentials_secret));
    }
    match &facts.database_credentials {
        Some(Ok(())) => entry(
            ComplianceCheck::Database,
            Pass,
            "ExternalDatabase",
            format!("external PostgreSQL {}:{} database {} with credentials from a Secret", t.host, t.port, t.database),
            evidence,
        ),
        Some(Err(reason)) => entry(ComplianceCheck::Database, Fail, "CredentialsUnusable", reason.clone(), evidence),
        None => entry(ComplianceCheck::Database, Unknown, "NotYetMeasured", "credentials not checked yet", evidence),
    }
}

/// `passing/all`, e.g. `5/6`, for the Compliance printer column.
pub fn summary(entries: &[ComplianceEntry]) -> String {
    let passing = entries.iter().filter(|e| e.status == Pass).count();
    format!("{passing}/{}", entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DatabaseSpec, FhirEndpoint, FhirEndpointSpec, ServerFlavor, SslMode};
    use crate::discovery::{Capabilities, PdbApi};
    use crate::fhirendpoint::build::{self, Images, Inputs};
    use crate::fhirendpoint::{database, validate::validate};
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    /// The tls entry of an endpoint with this database and flavor, computed
    /// from the Deployment the builder makes (what the operator applies).
    fn tls_entry(ca_secret: Option<&str>, mode: SslMode, flavor: ServerFlavor) -> ComplianceEntry {
        let mut ep = FhirEndpoint::new(
            "patients",
            FhirEndpointSpec {
                database: Some(DatabaseSpec {
                    host: "db.example".into(),
                    port: 5432,
                    name: "fhir".into(),
                    credentials_secret: "creds".into(),
                    ssl_mode: mode,
                    ca_secret: ca_secret.map(Into::into),
                }),
                ..Default::default()
            },
        );
        ep.metadata.namespace = Some("clinical".into());
        ep.spec.server.flavor = flavor;
        if flavor == ServerFlavor::Helios {
            ep.spec.server.image = "ghcr.io/heliossoftware/hfs:0.2.7".into();
            ep.spec.public_url = Some("https://patients.clinical.svc".into());
        }
        let v = validate(&ep).unwrap();
        let inputs = Inputs {
            tier: None,
            keys: Vec::new(),
            tls_secret: "patients-tls".into(),
            tls_fingerprint: String::new(),
            capabilities: Capabilities { monitoring: false, pdb: PdbApi::V1 },
            images: Images::default(),
            jwks: Vec::new(),
            audit_public_key: None,
            key_hints: None,
        };
        let children = build::build(&v, crate::meta::owner_ref(&ep), &inputs).unwrap();
        let now = Timestamp::UNIX_EPOCH + SignedDuration::from_hours(24);
        let facts = Facts {
            access: None,
            audit: None,
            now,
            tls: TlsFact::Certificate {
                secret: "patients-tls".into(),
                info: CertInfo {
                    not_before: Timestamp::UNIX_EPOCH,
                    not_after: now + SignedDuration::from_hours(24),
                    fingerprint: String::new(),
                    dns_names: Vec::new(),
                },
            },
            network_policy: None,
            gateway_config: "patients-gateway".into(),
            key_schedules: Vec::new(),
            backup: BackupFact::NoPolicy,
            database_credentials: Some(Ok(())),
            deployment: "patients".into(),
            database: database::applied(&children.deployment),
            database_ca: ca_secret.map(|_| Ok(())),
        };
        evaluate(&v, &facts).remove(0)
    }

    #[test]
    fn verify_full_without_a_ca_fails_and_says_what_to_set() {
        let entry = tls_entry(None, SslMode::VerifyFull, ServerFlavor::Hapi);
        assert_eq!((entry.status, entry.reason.as_str()), (Fail, reasons::DATABASE_CA_MISSING));
        assert!(entry.message.contains("spec.database.caSecret"), "{}", entry.message);
    }

    #[test]
    fn verify_full_with_the_mounted_ca_passes_with_the_applied_evidence() {
        let entry = tls_entry(Some("patients-db-ca"), SslMode::VerifyFull, ServerFlavor::Hapi);
        assert_eq!(entry.status, Pass, "{entry:?}");
        assert!(
            entry
                .evidence
                .contains(&"Deployment/clinical/patients:env SPRING_DATASOURCE_URL sslmode=verify-full".into())
        );
        assert!(entry.evidence.contains(&"Secret/clinical/patients-db-ca:ca.crt".into()));
    }

    /// The auditLog entry for a verification made at `verified_at` with
    /// `sealEvery` 20 s.
    fn audit_entry(verification: super::super::audit_check::Verification) -> ComplianceEntry {
        let verified_at = Timestamp::UNIX_EPOCH + SignedDuration::from_hours(24);
        let facts = Facts {
            access: None,
            audit: Some(AuditFact {
                destination: "PersistentVolumeClaim/patients-audit".into(),
                key_secret: "patients-audit-key".into(),
                key_id: "af4c990c664db21f".into(),
                seal_every: std::time::Duration::from_secs(20),
                verified_at,
                verification,
            }),
            now: verified_at,
            tls: TlsFact::Unusable { secret: "patients-tls".into(), reason: String::new() },
            network_policy: None,
            gateway_config: "patients-gateway".into(),
            key_schedules: Vec::new(),
            backup: BackupFact::NoPolicy,
            database_credentials: None,
            deployment: "patients".into(),
            database: None,
            database_ca: None,
        };
        audit_log("clinical", &facts)
    }

    #[test]
    fn audit_log_passes_only_on_a_fresh_successful_verification() {
        use super::super::audit_check::Verification;
        let at = Timestamp::UNIX_EPOCH + SignedDuration::from_hours(24);
        let verified = |age: i64, problem: Option<&str>| Verification::Verified {
            last_seal: Some(at - SignedDuration::from_secs(age)),
            records: 30,
            streams: 2,
            problem: problem.map(Into::into),
        };
        let entry = audit_entry(verified(39, None));
        assert_eq!((entry.status, entry.reason.as_str()), (Pass, "AuditTrailVerified"));
        assert!(entry.evidence.contains(&"30 records in 2 streams".into()), "{entry:?}");
        let entry = audit_entry(verified(41, None));
        assert_eq!((entry.status, entry.reason.as_str()), (Fail, "CheckpointStale"));
        let entry = audit_entry(verified(1, Some("stream s: checkpoint 1, segment x, record seq 2: altered")));
        assert_eq!((entry.status, entry.reason.as_str()), (Fail, "AuditTrailBroken"));
        assert!(entry.message.contains("record seq 2"));
        let entry = audit_entry(Verification::Pending("verification Job patients-audit-1 runs".into()));
        assert_eq!((entry.status, entry.reason.as_str()), (Unknown, "VerificationPending"));
        assert!(entry.evidence.iter().all(|e| !e.starts_with("verified at")), "nothing verified yet: {entry:?}");
        let entry = audit_entry(Verification::Unreadable("verification Job x failed: DeadlineExceeded".into()));
        assert_eq!((entry.status, entry.reason.as_str()), (Fail, "DestinationUnreadable"));
    }

    #[test]
    fn what_cannot_be_verified_never_passes() {
        let entry = tls_entry(Some("ca"), SslMode::Require, ServerFlavor::Hapi);
        assert_eq!((entry.status, entry.reason.as_str()), (Fail, reasons::DATABASE_NOT_VERIFIED));
        let entry = tls_entry(Some("ca"), SslMode::VerifyFull, ServerFlavor::Helios);
        assert_eq!((entry.status, entry.reason.as_str()), (Fail, reasons::DATABASE_TLS_UNSUPPORTED));
    }
}
