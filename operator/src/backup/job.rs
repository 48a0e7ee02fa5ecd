//! The Jobs of a BackupPolicy, built as pure functions, and the shell
//! scripts their PostgreSQL containers run (the tests run the very same
//! scripts against a real PostgreSQL).
//!
//! A backup Job: init container `dump` (PostgreSQL image) runs `pg_dump
//! --format=custom` into a scratch volume and counts the rows of every
//! table in the dump; container `agent` (the operator's image) encrypts,
//! uploads, writes the manifest and applies retention.
//!
//! A restore drill Job: init container `fetch` (agent) downloads and
//! decrypts the latest backup; init container `restore` (PostgreSQL image)
//! starts a scratch PostgreSQL inside the pod, runs `pg_restore`, times it
//! and counts rows; container `verify` (agent) compares the counts with the
//! manifest's.

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaimVolumeSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;

use super::plan::{NewJob, RunKind};
use crate::api::BackupPolicy;
use crate::fhirendpoint::database::{CA_DIR, CA_VOLUME};
use crate::fhirendpoint::pod::{ca_volume, env, secret_env};
use crate::fhirendpoint::validate::Database;

/// Label naming the policy on its Jobs.
pub const POLICY_LABEL: &str = "fhiroperator.io/backup-policy";
/// Label saying what a Job does: `backup` or `restore-drill`.
pub const RUN_LABEL: &str = "fhiroperator.io/backup-run";
/// Annotation holding the slot a Job runs for (RFC 3339).
pub const SLOT_ANNOTATION: &str = "fhiroperator.io/slot";
/// The agent's container, whose termination message is the result.
pub const AGENT_CONTAINER: &str = "agent";
pub const VERIFY_CONTAINER: &str = "verify";
const SCRATCH: &str = "/scratch";
const KEYS: &str = "/keys";
const BACKUPS: &str = "/backups";
/// The uid of the `postgres` user in the official PostgreSQL images; every
/// container of the pod runs as it, so that the scratch files stay 0600.
const POSTGRES_UID: i64 = 999;
/// A backup or drill that runs longer than this fails.
const ACTIVE_DEADLINE_SECONDS: i64 = 6 * 3600;
/// Finished Jobs are deleted by the operator once their result is in
/// status; this TTL is the backstop (clusters with the TTL controller).
const TTL_SECONDS_AFTER_FINISHED: i32 = 7 * 86_400;

/// Runs in the PostgreSQL image with PGHOST, PGPORT, PGDATABASE, PGUSER,
/// PGPASSWORD, PGSSLMODE and, with `spec.database.caSecret`, PGSSLROOTCERT
/// set: writes `$SCRATCH/dump` and
/// `$SCRATCH/counts.tsv` (`<rows>\t<schema.table>` for every table whose
/// data the dump holds, counted from the dump itself, so the counts are of
/// exactly the snapshot that was dumped).
pub const DUMP_SCRIPT: &str = r#"set -eu
umask 077
pg_dump --format=custom --no-password --file="$SCRATCH/dump"
pg_restore --file=- "$SCRATCH/dump" | awk '
  copying == 0 && /^COPY .* FROM stdin;$/ {
    table = $0; sub(/^COPY /, "", table); sub(/ \(.*\) FROM stdin;$/, "", table); sub(/ FROM stdin;$/, "", table)
    rows = 0; copying = 1; next
  }
  copying == 1 && $0 == "\\." { printf "%d\t%s\n", rows, table; copying = 0; next }
  copying == 1 { rows++ }
' > "$SCRATCH/counts.tsv"
echo "pg_dump: $(wc -c < "$SCRATCH/dump") bytes, $(wc -l < "$SCRATCH/counts.tsv") tables"
"#;

/// Counts the rows of every table of the connected database, as
/// `<rows>\t<schema.table>` with the names quoted as pg_dump quotes them.
/// The table names never pass through a shell or a string of SQL built
/// outside the server.
pub const COUNT_QUERY: &str = "SELECT (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', \
     table_schema, table_name), false, true, '')))[1]::text::bigint, format('%I.%I', table_schema, table_name) \
     FROM information_schema.tables WHERE table_type = 'BASE TABLE' \
     AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 2";

/// Runs in the PostgreSQL image: a scratch server in `$SCRATCH/pgdata`,
/// listening on a Unix socket only, `pg_restore` of `$SCRATCH/dump` timed
/// into `$SCRATCH/restore-ms`, the row counts into `$SCRATCH/restored.tsv`.
pub const RESTORE_SCRIPT: &str = r#"set -eu
umask 077
data="$SCRATCH/pgdata"
initdb --pgdata="$data" --username=postgres --auth=trust --no-sync >/dev/null
pg_ctl --pgdata="$data" --wait --log="$SCRATCH/postgres.log" \
  --options="-c listen_addresses= -c unix_socket_directories=$SCRATCH -c fsync=off" start >/dev/null
trap 'pg_ctl --pgdata="$data" --mode=fast --wait stop >/dev/null' EXIT
export PGHOST="$SCRATCH" PGUSER=postgres
unset PGPASSWORD PGSSLMODE PGPORT
createdb restored
start=$(date +%s%N)
pg_restore --exit-on-error --no-owner --no-privileges --dbname=restored "$SCRATCH/dump"
end=$(date +%s%N)
echo $(( (end - start) / 1000000 )) > "$SCRATCH/restore-ms"
psql --dbname=restored --no-psqlrc --quiet --tuples-only --no-align --field-separator="$(printf '\t')" \
  --command="$COUNT_QUERY" > "$SCRATCH/restored.tsv"
echo "pg_restore: $(cat "$SCRATCH/restore-ms") ms, $(wc -l < "$SCRATCH/restored.tsv") tables"
"#;

/// Images a Job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobImages {
    /// The operator's own image (the agent).
    pub agent: String,
    /// A PostgreSQL image whose client is at least the server's version.
    pub postgres: String,
}

/// What a Job needs beyond the policy.
#[derive(Debug, Clone)]
pub struct JobInputs<'a> {
    pub policy: &'a BackupPolicy,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    /// The endpoint's database, validated.
    pub database: &'a Database,
    /// The Secret of the key schedule.
    pub key_secret: &'a str,
    pub images: &'a JobImages,
}

/// The Job for `job`.
pub fn build(job: &NewJob, inputs: &JobInputs<'_>) -> Job {
    let policy_name = inputs.policy.metadata.name.clone().unwrap_or_default();
    let mut labels = crate::jobs::labels(job.kind.label(), (POLICY_LABEL, &policy_name));
    labels.insert(RUN_LABEL.to_owned(), job.kind.label().to_owned());
    let (init_containers, containers) = match job.kind {
        RunKind::Backup => backup_containers(job, inputs, &policy_name),
        RunKind::Drill => drill_containers(inputs, &policy_name),
    };
    let mut volumes = vec![
        Volume { name: "scratch".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
        Volume {
            name: "keys".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(inputs.key_secret.to_owned()),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    // Only the dump connects to the endpoint's database; a drill restores
    // into a scratch server inside its own pod.
    if job.kind == RunKind::Backup
        && let Some(ca) = &inputs.database.ca_secret
    {
        volumes.push(ca_volume(ca));
    }
    if let Some(pvc) = &inputs.policy.spec.destination.persistent_volume_claim {
        volumes.push(Volume {
            name: "backups".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(job.kind == RunKind::Drill),
            }),
            ..Default::default()
        });
    }
    Job {
        metadata: ObjectMeta {
            name: Some(job.name.clone()),
            namespace: Some(inputs.namespace.to_owned()),
            labels: Some(labels.clone()),
            annotations: Some([(SLOT_ANNOTATION.to_owned(), job.slot.to_string())].into()),
            owner_references: Some(vec![inputs.owner.clone()]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(ACTIVE_DEADLINE_SECONDS),
            ttl_seconds_after_finished: Some(TTL_SECONDS_AFTER_FINISHED),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(POSTGRES_UID),
                        run_as_group: Some(POSTGRES_UID),
                        fs_group: Some(POSTGRES_UID),
                        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                        ..Default::default()
                    }),
                    init_containers: Some(init_containers),
                    containers,
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn backup_containers(job: &NewJob, inputs: &JobInputs<'_>, policy: &str) -> (Vec<Container>, Vec<Container>) {
    let db = inputs.database;
    let mut dump_mounts = vec![mount("scratch", SCRATCH, false)];
    if db.ca_secret.is_some() {
        dump_mounts.push(mount(CA_VOLUME, CA_DIR, true));
    }
    let dump = Container {
        name: "dump".into(),
        image: Some(inputs.images.postgres.clone()),
        command: Some(vec!["sh".into(), "-c".into(), DUMP_SCRIPT.into()]),
        env: Some(dump_env(db)),
        volume_mounts: Some(dump_mounts),
        ..hardened()
    };
    let spec = &inputs.policy.spec;
    let mut args = vec![
        "backup-agent".to_owned(),
        "backup".to_owned(),
        format!("--namespace={}", inputs.namespace),
        format!("--policy={policy}"),
        format!("--endpoint={}", spec.endpoint),
        format!("--database={}", db.target.database),
        format!("--backup-id={}", job.name),
        format!("--dump={SCRATCH}/dump"),
        format!("--counts={SCRATCH}/counts.tsv"),
        format!("--keys={KEYS}"),
        format!("--key-schedule={}", spec.encryption.key_schedule),
        format!("--keep-last={}", spec.retention.keep_last),
    ];
    if let Some(max_age) = &spec.retention.max_age {
        args.push(format!("--max-age={max_age}"));
    }
    let (destination, mut env_vars, mut mounts) = destination(inputs, false);
    args.extend(destination);
    env_vars.push(env("RUST_LOG", "info"));
    mounts.extend([mount("scratch", SCRATCH, false), mount("keys", KEYS, true)]);
    let agent = Container {
        name: AGENT_CONTAINER.into(),
        image: Some(inputs.images.agent.clone()),
        args: Some(args),
        env: Some(env_vars),
        volume_mounts: Some(mounts),
        ..hardened()
    };
    (vec![dump], vec![agent])
}

/// libpq's environment for the dump: each value verbatim, none through a
/// shell or a connection string.
pub fn dump_env(db: &Database) -> Vec<EnvVar> {
    let t = &db.target;
    let mut vars = vec![
        env("SCRATCH", SCRATCH),
        env("PGHOST", &t.host),
        env("PGPORT", t.port.to_string()),
        env("PGDATABASE", &t.database),
        secret_env("PGUSER", &db.credentials_secret, "username"),
        secret_env("PGPASSWORD", &db.credentials_secret, "password"),
        env("PGSSLMODE", &t.ssl_mode),
        env("PGCONNECT_TIMEOUT", "30"),
    ];
    if let Some(cert) = &t.root_cert {
        vars.push(env("PGSSLROOTCERT", cert));
    }
    vars
}

fn drill_containers(inputs: &JobInputs<'_>, policy: &str) -> (Vec<Container>, Vec<Container>) {
    let (destination, env_vars, mut mounts) = destination(inputs, true);
    mounts.extend([mount("scratch", SCRATCH, false), mount("keys", KEYS, true)]);
    let mut args = vec![
        "backup-agent".to_owned(),
        "fetch".to_owned(),
        format!("--namespace={}", inputs.namespace),
        format!("--policy={policy}"),
        format!("--keys={KEYS}"),
        format!("--out={SCRATCH}/dump"),
        format!("--manifest-out={SCRATCH}/manifest.json"),
    ];
    args.extend(destination);
    let fetch = Container {
        name: "fetch".into(),
        image: Some(inputs.images.agent.clone()),
        args: Some(args),
        env: Some(env_vars),
        volume_mounts: Some(mounts),
        ..hardened()
    };
    let restore = Container {
        name: "restore".into(),
        image: Some(inputs.images.postgres.clone()),
        command: Some(vec!["sh".into(), "-c".into(), RESTORE_SCRIPT.into()]),
        env: Some(vec![env("SCRATCH", SCRATCH), env("COUNT_QUERY", COUNT_QUERY)]),
        volume_mounts: Some(vec![mount("scratch", SCRATCH, false)]),
        ..hardened()
    };
    let verify = Container {
        name: VERIFY_CONTAINER.into(),
        image: Some(inputs.images.agent.clone()),
        args: Some(vec![
            "backup-agent".into(),
            "verify".into(),
            format!("--manifest={SCRATCH}/manifest.json"),
            format!("--counts={SCRATCH}/restored.tsv"),
            format!("--restore-millis={SCRATCH}/restore-ms"),
        ]),
        volume_mounts: Some(vec![mount("scratch", SCRATCH, true)]),
        ..hardened()
    };
    (vec![fetch, restore], vec![verify])
}

/// The agent's destination flags, env (S3 credentials from the policy's
/// Secret, never in arguments) and mounts.
fn destination(inputs: &JobInputs<'_>, read_only: bool) -> (Vec<String>, Vec<EnvVar>, Vec<VolumeMount>) {
    let dest = &inputs.policy.spec.destination;
    let args = dest.agent_flags(BACKUPS);
    if dest.persistent_volume_claim.is_some() {
        return (args, Vec::new(), vec![mount("backups", BACKUPS, read_only)]);
    }
    let Some(s3) = &dest.s3 else { return (Vec::new(), Vec::new(), Vec::new()) };
    let env_vars = vec![
        secret_env(super::store::ACCESS_KEY_ENV, &s3.credentials_secret, "accessKeyId"),
        secret_env(super::store::SECRET_KEY_ENV, &s3.credentials_secret, "secretAccessKey"),
    ];
    (args, env_vars, Vec::new())
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(read_only), ..Default::default() }
}

/// PSS "restricted": no privilege escalation, no capabilities, read-only
/// root file system; a failing container's last log lines become its
/// termination message.
fn hardened() -> Container {
    Container {
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        resources: Some(ResourceRequirements {
            requests: Some(
                [("cpu".to_owned(), Quantity("100m".into())), ("memory".to_owned(), Quantity("128Mi".into()))].into(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The slot a Job runs for, from its annotation.
pub fn slot_of(job: &Job) -> Option<Timestamp> {
    job.metadata.annotations.as_ref()?.get(SLOT_ANNOTATION)?.parse().ok()
}
