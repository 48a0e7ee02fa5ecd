//! Backup and restore round trips on a real PostgreSQL (Debian's packages)
//! with the real `pg_dump`/`pg_restore`, the very scripts the Jobs run, and
//! the operator's own binary as the backup agent and `restore` command: to a
//! directory (a PersistentVolumeClaim's stand-in) and to a real
//! S3-compatible server (s3s-fs) on loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fhir_operator::backup::job::{COUNT_QUERY, DUMP_SCRIPT, RESTORE_SCRIPT};
use fhir_operator::backup::manifest::{Manifest, Report};
use fhir_operator_e2e::postgres::{self, Postgres, bin_dir, hand_over, server_command};
use fhir_operator_e2e::s3::S3Server;

const NAMESPACE: &str = "clinic";
const POLICY: &str = "nightly";

/// A FHIR server's kind of schema: resources, versions with JSON and bytes,
/// a search index, a quoted table name, another schema, an empty table;
/// data with tabs, newlines, backslashes, quotes and NULLs.
const SCHEMA_AND_DATA: &str = r#"
CREATE TABLE hfj_resource (res_id bigserial PRIMARY KEY, res_type text NOT NULL, res_ver int NOT NULL,
  res_updated timestamptz NOT NULL);
CREATE TABLE hfj_res_ver (pid bigserial PRIMARY KEY, res_id bigint NOT NULL REFERENCES hfj_resource,
  res_text jsonb, res_bin bytea);
CREATE TABLE hfj_spidx_string (sp_id bigserial PRIMARY KEY, res_id bigint REFERENCES hfj_resource,
  sp_name text, sp_value_normalized text);
CREATE TABLE "Audit Trail" (id int, note text);
CREATE SCHEMA terminology;
CREATE TABLE terminology.concept (code text PRIMARY KEY, display text);
CREATE TABLE hfj_empty (x int);
INSERT INTO hfj_resource (res_type, res_ver, res_updated)
  SELECT CASE WHEN i % 3 = 0 THEN 'Observation' ELSE 'Patient' END, 1 + i % 4,
         timestamptz '2026-01-01 00:00:00+00' + i * interval '1 minute'
  FROM generate_series(1, 1500) i;
INSERT INTO hfj_res_ver (res_id, res_text, res_bin)
  SELECT i, jsonb_build_object('resourceType', 'Patient', 'id', i::text,
           'name', jsonb_build_array(jsonb_build_object('family', 'Doe-' || i, 'given', jsonb_build_array('Jane')))),
         CASE WHEN i % 5 = 0 THEN NULL ELSE decode(md5(i::text), 'hex') END
  FROM generate_series(1, 1500) i;
INSERT INTO hfj_spidx_string (res_id, sp_name, sp_value_normalized)
  SELECT 1 + i % 1500, 'family', E'doe\t' || i || E'\nline two \\ back\\slash ''quoted'''
  FROM generate_series(1, 3000) i;
INSERT INTO "Audit Trail" VALUES (1, 'created'), (2, NULL), (3, E'multi\nline');
INSERT INTO terminology.concept SELECT 'C' || i, 'Concept ' || i FROM generate_series(1, 250) i;
"#;

struct Fixture {
    pg: Postgres,
    work: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let pg = Postgres::start().expect("a real PostgreSQL (Debian's postgresql package)");
        pg.create_database("fhir").unwrap();
        pg.sql("fhir", SCHEMA_AND_DATA).unwrap();
        let work = tempfile::Builder::new().prefix("fhir-backup-").tempdir().unwrap();
        Fixture { pg, work }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// A key directory as the Job mounts the schedule's Secret: `vN.key`
    /// for each version and `current.key`.
    fn keys(&self, name: &str, versions: &[(i64, [u8; 32])], current: i64) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (version, key) in versions {
            std::fs::write(dir.join(format!("v{version}.key")), key).unwrap();
            if *version == current {
                std::fs::write(dir.join("current.key"), key).unwrap();
            }
        }
        dir
    }

    /// The backup Job's `dump` init container: the real script, pg_dump
    /// and pg_restore. Returns the scratch directory.
    fn dump(&self, name: &str) -> PathBuf {
        let scratch = self.path(name);
        std::fs::create_dir_all(&scratch).unwrap();
        let path = format!("{}:{}", bin_dir().unwrap().display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("sh")
            .args(["-c", DUMP_SCRIPT])
            .env("SCRATCH", &scratch)
            .env("PATH", path)
            .envs(self.pg.env("fhir"))
            .output()
            .unwrap();
        assert!(out.status.success(), "dump script: {}", String::from_utf8_lossy(&out.stderr));
        scratch
    }

    /// The Job's `agent` container: `fhir-operator backup-agent backup`.
    /// `env`: the S3 credentials, as the Job sets them from the policy's Secret.
    fn backup(
        &self,
        id: &str,
        keys: &Path,
        destination: &[String],
        keep_last: usize,
        env: &[(&str, &str)],
    ) -> (Output, Report) {
        let scratch = self.dump(&format!("scratch-{id}"));
        let log = scratch.join("termination-log");
        let mut command = Command::new(operator_binary());
        command.args(["backup-agent", "--termination-log"]).arg(&log).args([
            "backup",
            &format!("--namespace={NAMESPACE}"),
            &format!("--policy={POLICY}"),
            "--endpoint=patients",
            "--database=fhir",
            &format!("--backup-id={id}"),
            "--key-schedule=backup-key",
            &format!("--keep-last={keep_last}"),
        ]);
        command.arg("--dump").arg(scratch.join("dump")).arg("--counts").arg(scratch.join("counts.tsv"));
        command.arg("--keys").arg(keys).args(destination).envs(env.iter().copied());
        let out = command.output().unwrap();
        let report = Report::from_message(&std::fs::read_to_string(&log).unwrap()).unwrap();
        (out, report)
    }

    /// `fhir-operator restore` into a new database `target`.
    fn restore(&self, target: &str, keys: &Path, destination: &[String], backup: Option<&str>) -> Output {
        self.pg.create_database(target).unwrap();
        let bin = bin_dir().unwrap();
        let mut command = Command::new(operator_binary());
        command.args(["restore", &format!("--namespace={NAMESPACE}"), &format!("--policy={POLICY}")]);
        command.arg("--keys").arg(keys).args(destination);
        command.arg("--target").arg(self.pg.conninfo(target));
        command.arg("--pg-restore").arg(bin.join("pg_restore")).arg("--psql").arg(bin.join("psql"));
        if let Some(id) = backup {
            command.arg(format!("--backup={id}"));
        }
        command.output().unwrap()
    }

    /// Every user table's full contents, as text, ordered: the fingerprint
    /// two databases must share.
    fn contents(&self, database: &str) -> BTreeMap<String, String> {
        let tables = self
            .pg
            .sql(database, &format!("SELECT format('%I.%I', table_schema, table_name) FROM ({COUNT_QUERY_TABLES}) t"))
            .unwrap();
        tables
            .lines()
            .map(|table| {
                let digest = self
                    .pg
                    .sql(database, &format!("SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"))
                    .unwrap();
                (table.to_owned(), digest.trim().to_owned())
            })
            .collect()
    }
}

const COUNT_QUERY_TABLES: &str = "SELECT table_schema, table_name FROM information_schema.tables \
    WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2";

/// The drill's container `verify` on the scratch directory's files.
fn verify(scratch: &Path, log: &Path) -> Output {
    Command::new(operator_binary())
        .args(["backup-agent", "--termination-log"])
        .arg(log)
        .args(["verify"])
        .arg("--manifest")
        .arg(scratch.join("manifest.json"))
        .arg("--counts")
        .arg(scratch.join("restored.tsv"))
        .arg("--restore-millis")
        .arg(scratch.join("restore-ms"))
        .output()
        .unwrap()
}

fn operator_binary() -> PathBuf {
    fhir_operator_e2e::operator::binary()
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut key).unwrap();
    key
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn succeeded(report: &Report) -> &fhir_operator::backup::manifest::BackupReport {
    match report {
        Report::Backup(b) => b,
        other => panic!("expected a backup report, got {other:?}"),
    }
}

fn manifest_of(dir: &Path, id: &str) -> PathBuf {
    dir.join(NAMESPACE).join(POLICY).join(format!("{id}.manifest.json"))
}

#[test]
fn a_directory_backup_restores_every_table_exactly_and_refuses_tampering() {
    let f = Fixture::new();
    let store = f.path("volume");
    let destination = vec![format!("--dir={}", store.display())];
    let (k1, k2) = (random_key(), random_key());

    // Backup 1 with key version 1.
    let keys_v1 = f.keys("keys-v1", &[(1, k1)], 1);
    let (out, report) = f.backup("nightly-202611220130", &keys_v1, &destination, 7, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let first = succeeded(&report).clone();
    assert_eq!(first.key_version, 1);
    assert_eq!(first.tables, 6, "{first:?}");
    assert_eq!(first.rows, 1500 + 1500 + 3000 + 3 + 250);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(manifest_of(&store, "nightly-202611220130")).unwrap()).unwrap();
    assert_eq!(manifest.tables["public.\"Audit Trail\""], 3);
    assert_eq!(manifest.tables["terminology.concept"], 250);
    assert_eq!(manifest.tables["public.hfj_empty"], 0);
    assert_eq!(manifest.sha256, first.sha256);
    // The stored dump is age ciphertext, not a PostgreSQL archive.
    let sealed = std::fs::read(store.join(&manifest.object)).unwrap();
    assert!(sealed.starts_with(b"age-encryption.org/v1\n-> scrypt "), "not an age scrypt file");
    assert!(!sealed.windows(5).any(|w| w == b"PGDMP"), "plaintext dump header in the stored file");
    assert_eq!(sealed.len() as i64, manifest.size_bytes);

    // Restore into a second database: every table's contents are equal.
    let out = f.restore("restored", &keys_v1, &destination, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("verified against its manifest"), "{}", text(&out));
    let (source, restored) = (f.contents("fhir"), f.contents("restored"));
    assert_eq!(source.len(), 6);
    assert_eq!(source, restored, "restored contents differ");

    // The key rotates: version 2 is current, version 1 is in its grace period.
    let keys_both = f.keys("keys-v1-v2", &[(1, k1), (2, k2)], 2);
    f.pg.sql("fhir", "INSERT INTO terminology.concept VALUES ('NEW', 'after the first backup')").unwrap();
    let (out, report) = f.backup("nightly-202611230130", &keys_both, &destination, 7, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(succeeded(&report).key_version, 2);
    // The backup made with the previous key still restores during the grace period.
    let out = f.restore("restored_v1", &keys_both, &destination, Some("nightly-202611220130"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.contents("restored_v1"), restored);
    // The latest is the new one, with the new row.
    let out = f.restore("restored_latest", &keys_both, &destination, None);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.contents("restored_latest"), f.contents("fhir"));
    // Once version 1 is gone from the Secret, its backups cannot be read,
    // and the error says which key version is missing.
    let keys_v2 = f.keys("keys-v2", &[(2, k2)], 2);
    let out = f.restore("restored_gone", &keys_v2, &destination, Some("nightly-202611220130"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("key version 1 of KeyRotationSchedule backup-key is no longer in its Secret"),
        "{}",
        text(&out)
    );

    // Tampering, 1: a flipped byte; the manifest's SHA-256 catches it.
    let tampered_store = f.path("tampered");
    copy_dir(&store, &tampered_store);
    let tampered_destination = vec![format!("--dir={}", tampered_store.display())];
    let dump = tampered_store.join(&manifest.object);
    let mut bytes = std::fs::read(&dump).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&dump, &bytes).unwrap();
    let out = f.restore("restored_t1", &keys_both, &tampered_destination, Some("nightly-202611220130"));
    assert!(!out.status.success());
    assert!(text(&out).contains("the manifest says"), "{}", text(&out));
    // Tampering, 2: the manifest rewritten to match; decryption refuses.
    let mut forged = manifest.clone();
    forged.sha256 = fhir_operator::meta::sha256_hex(&bytes);
    std::fs::write(manifest_of(&tampered_store, "nightly-202611220130"), serde_json::to_vec(&forged).unwrap()).unwrap();
    let out = f.restore("restored_t2", &keys_both, &tampered_destination, Some("nightly-202611220130"));
    assert!(!out.status.success());
    assert!(text(&out).contains("decrypting backup nightly-202611220130"), "{}", text(&out));
    let partial =
        f.pg.sql("restored_t2", "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
            .unwrap();
    assert_eq!(partial.trim(), "0", "nothing may be restored from a tampered backup");
    // And the wrong key (version 2's for a version-1 backup, by forging the version).
    let mut wrong = manifest.clone();
    wrong.encryption.key_version = 2;
    std::fs::write(manifest_of(&tampered_store, "nightly-202611220130"), serde_json::to_vec(&wrong).unwrap()).unwrap();
    std::fs::copy(store.join(&manifest.object), &dump).unwrap();
    let out = f.restore("restored_t3", &keys_both, &tampered_destination, Some("nightly-202611220130"));
    assert!(!out.status.success());
    assert!(text(&out).contains("decrypting backup nightly-202611220130"), "{}", text(&out));
}

#[test]
fn the_restore_drill_containers_restore_into_a_scratch_server_and_check_the_counts() {
    let f = Fixture::new();
    let store = f.path("volume");
    let destination = vec![format!("--dir={}", store.display())];
    let keys = f.keys("keys", &[(1, random_key())], 1);
    let (out, _) = f.backup("nightly-202611220130", &keys, &destination, 7, &[]);
    assert!(out.status.success(), "{}", text(&out));

    // Init container `fetch`.
    let scratch = f.path("drill");
    std::fs::create_dir_all(&scratch).unwrap();
    let log = scratch.join("fetch-log");
    let out = Command::new(operator_binary())
        .args(["backup-agent", "--termination-log"])
        .arg(&log)
        .args(["fetch", &format!("--namespace={NAMESPACE}"), &format!("--policy={POLICY}")])
        .arg("--keys")
        .arg(&keys)
        .arg("--out")
        .arg(scratch.join("dump"))
        .arg("--manifest-out")
        .arg(scratch.join("manifest.json"))
        .args(&destination)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(std::fs::read(scratch.join("dump")).unwrap().starts_with(b"PGDMP"), "decrypted dump");

    // Init container `restore`: a scratch PostgreSQL inside the "pod".
    hand_over(&scratch).unwrap();
    let out = postgres::run(
        server_command("sh")
            .unwrap()
            .args(["-c", RESTORE_SCRIPT])
            .env("SCRATCH", &scratch)
            .env("COUNT_QUERY", COUNT_QUERY),
    )
    .unwrap();
    assert!(text(&out).contains("pg_restore:"), "{}", text(&out));

    // Container `verify`.
    let log = scratch.join("verify-log");
    let out = verify(&scratch, &log);
    assert!(out.status.success(), "{}", text(&out));
    match Report::from_message(&std::fs::read_to_string(&log).unwrap()).unwrap() {
        Report::Drill(d) => {
            assert_eq!(d.backup, "nightly-202611220130");
            assert_eq!(d.tables, 6);
            assert!(d.duration_seconds > 0.0, "{d:?}");
        }
        other => panic!("{other:?}"),
    }

    // A restored table with a row missing fails the check, naming the table.
    let counts = std::fs::read_to_string(scratch.join("restored.tsv")).unwrap();
    let short = counts.replace("250\tterminology.concept", "249\tterminology.concept");
    assert_ne!(short, counts);
    std::fs::write(scratch.join("restored.tsv"), short).unwrap();
    let out = verify(&scratch, &log);
    assert!(!out.status.success());
    let report = std::fs::read_to_string(&log).unwrap();
    assert!(report.contains("terminology.concept: 250 rows in the backup, 249 restored"), "{report}");
}

#[test]
fn an_s3_backup_round_trips_prunes_by_retention_and_never_prints_the_secret() {
    let f = Fixture::new();
    let server = S3Server::start("fhir-backups").expect("s3s-fs: run `bash e2e/s3s.sh` (bash .ci/run does)");
    let destination = vec![
        "--s3-bucket=fhir-backups".to_owned(),
        "--s3-prefix=prod/patients".to_owned(),
        format!("--s3-endpoint={}", server.endpoint()),
        "--s3-region=us-east-1".to_owned(),
    ];
    let keys = f.keys("keys", &[(1, random_key())], 1);
    // Four backups with keepLast 2: the two oldest are pruned.
    let mut reports = Vec::new();
    for id in ["nightly-202611200130", "nightly-202611210130", "nightly-202611220130", "nightly-202611230130"] {
        let (out, report) = f.backup(id, &keys, &destination, 2, &server.credentials(server.secret_key()));
        assert!(out.status.success(), "{}", text(&out));
        reports.push(succeeded(&report).clone());
    }
    assert_eq!(reports[0].pruned, Vec::<String>::new());
    assert_eq!(reports[1].pruned, Vec::<String>::new());
    assert_eq!(reports[2].pruned, vec!["nightly-202611200130".to_owned()]);
    assert_eq!(reports[3].pruned, vec!["nightly-202611210130".to_owned()]);
    let mut objects = server.objects();
    objects.sort();
    assert_eq!(
        objects,
        [
            "prod/patients/clinic/nightly/nightly-202611220130.dump.age",
            "prod/patients/clinic/nightly/nightly-202611220130.manifest.json",
            "prod/patients/clinic/nightly/nightly-202611230130.dump.age",
            "prod/patients/clinic/nightly/nightly-202611230130.manifest.json",
        ]
    );
    assert!(reports[3].location.contains("s3 bucket fhir-backups"), "{}", reports[3].location);

    // Restore the latest from S3 and compare every table.
    f.pg.create_database("restored").unwrap();
    let bin = bin_dir().unwrap();
    let mut restore = Command::new(operator_binary());
    restore
        .args(["restore", &format!("--namespace={NAMESPACE}"), &format!("--policy={POLICY}")])
        .arg("--keys")
        .arg(&keys)
        .args(&destination)
        .arg("--target")
        .arg(f.pg.conninfo("restored"))
        .arg("--pg-restore")
        .arg(bin.join("pg_restore"))
        .arg("--psql")
        .arg(bin.join("psql"));
    let out = restore.envs(server.credentials(server.secret_key())).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nightly-202611230130"), "{}", text(&out));
    assert_eq!(f.contents("restored"), f.contents("fhir"));

    // Wrong credentials: the error names the bucket and never the secret.
    let canary = "canary-SECRET-9f8e7d6c5b4a";
    let (out, report) = f.backup("nightly-202611240130", &keys, &destination, 2, &server.credentials(canary));
    assert!(!out.status.success());
    let Report::Failed { message } = &report else { panic!("{report:?}") };
    assert!(message.contains("s3 bucket fhir-backups"), "{message}");
    for shown in [text(&out), message.clone(), serde_json::to_string(&report).unwrap()] {
        assert!(!shown.contains(canary), "the secret key was printed: {shown}");
    }
    // Nothing of the failed backup is left as a complete backup.
    assert_eq!(server.objects().len(), 4);
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in walk(from) {
        let target = to.join(entry.strip_prefix(from).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
