//! `fhir-operator backup-agent`: the part of a backup or restore drill Job
//! that runs the operator's own binary, beside a PostgreSQL container:
//!
//! - `backup`: encrypts the dump that `pg_dump` left in the scratch volume
//!   (the age format, keyed with the current version of the policy's
//!   `aes-256` key schedule), uploads it, writes the manifest, applies
//!   retention;
//! - `fetch`: downloads a backup (the latest by default), checks its size
//!   and SHA-256 against the manifest, and decrypts it;
//! - `verify`: compares the row counts of a restored database with the
//!   manifest's.
//!
//! Each writes a [`Report`] as its container's termination message, which
//! is how the operator learns the result. `fhir-operator restore` runs
//! `fetch`, `pg_restore` and `verify` in one go for a real recovery.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path as FsPath, PathBuf};

use age::secrecy::SecretString;
use base64ct::{Base64, Encoding};
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::manifest::{
    BackupReport, DrillReport, ENCRYPTION_FORMAT, Encryption, MANIFEST_FORMAT, Manifest, Report, parse_counts,
};
use super::plan::{self, Stored};
use super::store::{Destination, DestinationArgs, StoreError};
use crate::keyrotation::keys::KEY_BYTES;
use crate::keyrotation::schedule::parse_duration;

/// scrypt's work factor (log2 N). The passphrase is a random 256-bit key,
/// not something a person chose, so the key derivation has nothing to
/// slow down: the lowest cost age allows a decryptor to accept by default.
const SCRYPT_WORK_FACTOR: u8 = 10;
/// The highest work factor accepted when decrypting.
const SCRYPT_MAX_WORK_FACTOR: u8 = 20;
pub use crate::jobs::TERMINATION_LOG;

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: AgentCommand,
    /// Where to write the report (the container's termination message).
    #[arg(long, global = true, value_name = "FILE", default_value = TERMINATION_LOG)]
    pub termination_log: PathBuf,
}

#[derive(clap::Subcommand, Debug)]
pub enum AgentCommand {
    /// Encrypt a pg_dump, upload it with its manifest, apply retention.
    Backup(BackupArgs),
    /// Download, check and decrypt a backup.
    Fetch(FetchArgs),
    /// Compare a restored database's row counts with the manifest.
    Verify(VerifyArgs),
}

/// Which policy's backups.
#[derive(clap::Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Namespace of the BackupPolicy.
    #[arg(long)]
    pub namespace: String,
    /// Name of the BackupPolicy.
    #[arg(long)]
    pub policy: String,
}

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub destination: DestinationArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[arg(long)]
    pub endpoint: String,
    #[arg(long)]
    pub database: String,
    /// The backup's id (the Job's name).
    #[arg(long)]
    pub backup_id: String,
    /// The `pg_dump --format=custom` output.
    #[arg(long, value_name = "FILE")]
    pub dump: PathBuf,
    /// Row counts per table, `<rows>\t<table>` lines.
    #[arg(long, value_name = "FILE")]
    pub counts: PathBuf,
    /// The key schedule's Secret, mounted: `vN.key` and `current.key`.
    #[arg(long, value_name = "DIR")]
    pub keys: PathBuf,
    /// The KeyRotationSchedule's name, recorded in the manifest.
    #[arg(long)]
    pub key_schedule: String,
    #[arg(long, default_value_t = 7)]
    pub keep_last: usize,
    /// e.g. `30d`.
    #[arg(long)]
    pub max_age: Option<String>,
    /// When the Job started (default: now); the dump started after it.
    #[arg(long)]
    pub started_at: Option<Timestamp>,
}

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    #[command(flatten)]
    pub destination: DestinationArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// The backup to fetch (default: the latest).
    #[arg(long)]
    pub backup: Option<String>,
    #[arg(long, value_name = "DIR")]
    pub keys: PathBuf,
    /// Where to write the decrypted dump.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Where to write the backup's manifest.
    #[arg(long, value_name = "FILE")]
    pub manifest_out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// Row counts of the restored database, `<rows>\t<table>` lines.
    #[arg(long, value_name = "FILE")]
    pub counts: PathBuf,
    /// A file holding how long `pg_restore` took, in milliseconds.
    #[arg(long, value_name = "FILE")]
    pub restore_millis: PathBuf,
}

/// What can go wrong. Messages name files, objects, key versions and
/// buckets; never key material or credentials.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {path}: {source}")]
    File { what: &'static str, path: String, source: std::io::Error },
    #[error("{0}")]
    Keys(String),
    #[error("encrypting: {0}")]
    Encrypt(String),
    #[error("decrypting backup {backup}: {message}")]
    Decrypt { backup: String, message: String },
    #[error("backup {backup}: {message}")]
    Integrity { backup: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the restored database does not match backup {backup}: {mismatches}")]
    Mismatch { backup: String, mismatches: String },
    #[error("{0}")]
    Command(String),
}

fn file_error(what: &'static str, path: &FsPath) -> impl FnOnce(std::io::Error) -> AgentError + use<> {
    let path = path.display().to_string();
    move |source| AgentError::File { what, path, source }
}

/// Runs an agent subcommand and writes its report to the termination log.
pub async fn run(args: AgentArgs) -> Result<(), String> {
    let result = match &args.command {
        AgentCommand::Backup(a) => backup(a).await.map(Report::Backup),
        AgentCommand::Fetch(a) => fetch(a).await.map(|m| Report::Fetched { backup: m.backup }),
        AgentCommand::Verify(a) => verify(a).map(Report::Drill),
    };
    let report = match &result {
        Ok(report) => report.clone(),
        Err(e) => Report::Failed { message: e.to_string() },
    };
    let message = report.to_message();
    println!("{message}");
    if let Err(e) = std::fs::write(&args.termination_log, &message) {
        eprintln!("fhir-operator: cannot write the report to {}: {e}", args.termination_log.display());
    }
    result.map(|_| ()).map_err(|e| e.to_string())
}

/// The keys of a schedule, by version.
pub struct Keys(BTreeMap<i64, Zeroizing<[u8; KEY_BYTES]>>, Option<i64>);

impl Keys {
    /// Reads a mounted key Secret: `vN.key` files, and `current.key` to
    /// know which version is current.
    pub fn from_dir(dir: &FsPath) -> Result<Self, AgentError> {
        let mut entries: BTreeMap<String, Zeroizing<Vec<u8>>> = BTreeMap::new();
        let read = std::fs::read_dir(dir).map_err(file_error("reading the key directory", dir))?;
        for entry in read {
            let entry = entry.map_err(file_error("reading the key directory", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".key") && !name.starts_with('.') {
                let bytes = std::fs::read(entry.path()).map_err(file_error("reading key", &entry.path()))?;
                entries.insert(name, Zeroizing::new(bytes));
            }
        }
        Self::from_entries(&entries, &dir.display().to_string())
    }

    /// From Secret entries (`vN.key`, `current.key`).
    pub fn from_entries(entries: &BTreeMap<String, Zeroizing<Vec<u8>>>, source: &str) -> Result<Self, AgentError> {
        let mut keys = BTreeMap::new();
        for (name, bytes) in entries {
            let Some(version) =
                name.strip_prefix('v').and_then(|v| v.strip_suffix(".key")).and_then(|v| v.parse().ok())
            else {
                continue;
            };
            let key: [u8; KEY_BYTES] = bytes.as_slice().try_into().map_err(|_| {
                AgentError::Keys(format!("{source}: v{version}.key is not a {KEY_BYTES}-byte aes-256 key"))
            })?;
            keys.insert(version, Zeroizing::new(key));
        }
        let current = entries
            .get("current.key")
            .and_then(|c| keys.iter().find(|(_, k)| k.as_slice() == c.as_slice()).map(|(v, _)| *v));
        Ok(Keys(keys, current))
    }

    /// The current version and its key.
    pub fn current(&self, source: &str) -> Result<(i64, &[u8; KEY_BYTES]), AgentError> {
        let version = self.1.ok_or_else(|| {
            AgentError::Keys(format!(
                "{source}: no current key (current.key missing or matching no vN.key): \
                 is the KeyRotationSchedule's Secret mounted, and of algorithm aes-256?"
            ))
        })?;
        Ok((version, &self.0[&version]))
    }

    pub fn version(&self, version: i64, schedule: &str) -> Result<&[u8; KEY_BYTES], AgentError> {
        self.0.get(&version).map(|k| &**k).ok_or_else(|| {
            AgentError::Keys(format!(
                "key version {version} of KeyRotationSchedule {schedule} is no longer in its Secret \
                 (versions held: {:?}); it was pruned beyond keepVersions, so backups encrypted with it \
                 cannot be decrypted",
                self.0.keys().collect::<Vec<_>>()
            ))
        })
    }
}

/// The age passphrase of a key: its standard base64, exactly what
/// `kubectl get secret -o jsonpath='{.data.v3\.key}'` prints.
fn passphrase(key: &[u8; KEY_BYTES]) -> SecretString {
    SecretString::from(Base64::encode_string(key))
}

/// Writes what passes through to `inner` while hashing and counting it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Encrypts `plain` into `sealed` (age, scrypt recipient); returns the
/// size and SHA-256 of the encrypted file.
pub fn encrypt_file(plain: &FsPath, sealed: &FsPath, key: &[u8; KEY_BYTES]) -> Result<(u64, String), AgentError> {
    let mut input = std::fs::File::open(plain).map_err(file_error("reading the dump", plain))?;
    let output = std::fs::File::create(sealed).map_err(file_error("creating", sealed))?;
    let mut recipient = age::scrypt::Recipient::new(passphrase(key));
    recipient.set_work_factor(SCRYPT_WORK_FACTOR);
    let encryptor = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .map_err(|e| AgentError::Encrypt(e.to_string()))?;
    let mut writer = encryptor
        .wrap_output(Hashing { inner: std::io::BufWriter::new(output), hash: Sha256::new(), bytes: 0 })
        .map_err(|e| AgentError::Encrypt(e.to_string()))?;
    std::io::copy(&mut input, &mut writer).map_err(file_error("encrypting", plain))?;
    let mut hashing = writer.finish().map_err(file_error("encrypting", plain))?;
    hashing.flush().map_err(file_error("writing", sealed))?;
    Ok((hashing.bytes, hex::encode(hashing.hash.finalize())))
}

/// Decrypts `sealed` into `plain` (created 0600). A tampered or truncated
/// file, or the wrong key, fails: age authenticates every chunk.
pub fn decrypt_file(sealed: &FsPath, plain: &FsPath, key: &[u8; KEY_BYTES], backup: &str) -> Result<(), AgentError> {
    let fail = |message: String| AgentError::Decrypt { backup: backup.to_owned(), message };
    let input = std::io::BufReader::new(std::fs::File::open(sealed).map_err(file_error("reading", sealed))?);
    let decryptor = age::Decryptor::new_buffered(input).map_err(|e| fail(e.to_string()))?;
    let mut identity = age::scrypt::Identity::new(passphrase(key));
    identity.set_max_work_factor(SCRYPT_MAX_WORK_FACTOR);
    let mut reader =
        decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity)).map_err(|e| fail(e.to_string()))?;
    let mut output = std::fs::OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::mode(output.write(true).create(true).truncate(true), 0o600);
    let mut output = std::io::BufWriter::new(output.open(plain).map_err(file_error("creating", plain))?);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = reader
            .read(&mut buffer)
            .map_err(|e| fail(format!("{e} (the file was altered, truncated, or encrypted with another key)")))?;
        if n == 0 {
            break;
        }
        output.write_all(&buffer[..n]).map_err(file_error("writing", plain))?;
    }
    output.flush().map_err(file_error("writing", plain))
}

fn sha256_file(path: &FsPath) -> Result<(u64, String), AgentError> {
    let mut file = std::fs::File::open(path).map_err(file_error("reading", path))?;
    let mut hashing = Hashing { inner: std::io::sink(), hash: Sha256::new(), bytes: 0 };
    std::io::copy(&mut file, &mut hashing).map_err(file_error("reading", path))?;
    Ok((hashing.bytes, hex::encode(hashing.hash.finalize())))
}

/// `backup-agent backup`.
pub async fn backup(args: &BackupArgs) -> Result<BackupReport, AgentError> {
    let started_at = args.started_at.unwrap_or_else(Timestamp::now);
    let max_age = match &args.max_age {
        Some(text) => Some(
            parse_duration(text).ok_or_else(|| AgentError::Invalid(format!("--max-age {text:?} is not a duration")))?,
        ),
        None => None,
    };
    let counts = std::fs::read_to_string(&args.counts).map_err(file_error("reading the row counts", &args.counts))?;
    let tables = parse_counts(&counts).map_err(|e| AgentError::Invalid(format!("{}: {e}", args.counts.display())))?;
    let keys = Keys::from_dir(&args.keys)?;
    let (key_version, key) = keys.current(&args.keys.display().to_string())?;
    let destination = Destination::open(&args.destination, &args.policy.namespace, &args.policy.policy)?;

    let sealed = args.dump.with_extension("age");
    let (size, sha256) = encrypt_file(&args.dump, &sealed, key)?;
    // The plaintext dump is not needed any more.
    let _ = std::fs::remove_file(&args.dump);
    let object = destination.dump_path(&args.backup_id);
    destination.upload(&sealed, &object).await?;
    let _ = std::fs::remove_file(&sealed);
    let finished_at = Timestamp::now();
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT,
        backup: args.backup_id.clone(),
        namespace: args.policy.namespace.clone(),
        policy: args.policy.policy.clone(),
        endpoint: args.endpoint.clone(),
        database: args.database.clone(),
        object: object.to_string(),
        size_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        sha256: sha256.clone(),
        encryption: Encryption {
            format: ENCRYPTION_FORMAT.into(),
            key_schedule: args.key_schedule.clone(),
            key_version,
        },
        dump_format: "custom".into(),
        started_at,
        finished_at,
        tables: tables.clone(),
    };
    destination.put_manifest(&manifest).await?;

    // Retention, only after this backup is complete; it is the newest, so
    // it is never pruned.
    let stored: Vec<Stored> = destination
        .manifests()
        .await?
        .into_iter()
        .map(|m| Stored { id: m.backup, finished_at: m.finished_at })
        .collect();
    let pruned = plan::prune(&stored, args.keep_last, max_age, finished_at);
    for id in &pruned {
        destination.remove(id).await?;
    }
    Ok(BackupReport {
        location: format!("{}: {object}", destination.describe()),
        size_bytes: manifest.size_bytes,
        sha256,
        key_version,
        started_at,
        finished_at,
        tables: tables.len(),
        rows: tables.values().sum(),
        pruned,
    })
}

/// `backup-agent fetch`: the decrypted dump and its manifest.
pub async fn fetch(args: &FetchArgs) -> Result<Manifest, AgentError> {
    let keys = Keys::from_dir(&args.keys)?;
    fetch_with(&args.destination, &args.policy, args.backup.as_deref(), &keys, &args.out, Some(&args.manifest_out))
        .await
}

pub async fn fetch_with(
    destination: &DestinationArgs,
    policy: &PolicyArgs,
    backup: Option<&str>,
    keys: &Keys,
    out: &FsPath,
    manifest_out: Option<&FsPath>,
) -> Result<Manifest, AgentError> {
    let destination = Destination::open(destination, &policy.namespace, &policy.policy)?;
    let mut manifests = destination.manifests().await?;
    manifests.sort_by(|a, b| b.finished_at.cmp(&a.finished_at).then_with(|| b.backup.cmp(&a.backup)));
    let manifest = match backup {
        Some(id) => manifests.into_iter().find(|m| m.backup == id).ok_or_else(|| {
            AgentError::NotFound(format!(
                "{}: no backup {id:?} of BackupPolicy {}/{}",
                destination.describe(),
                policy.namespace,
                policy.policy
            ))
        })?,
        None => manifests.into_iter().next().ok_or_else(|| {
            AgentError::NotFound(format!(
                "{}: no backup of BackupPolicy {}/{} yet",
                destination.describe(),
                policy.namespace,
                policy.policy
            ))
        })?,
    };
    if manifest.encryption.format != ENCRYPTION_FORMAT {
        return Err(AgentError::Invalid(format!(
            "backup {}: unknown encryption format {:?}",
            manifest.backup, manifest.encryption.format
        )));
    }
    let key = keys.version(manifest.encryption.key_version, &manifest.encryption.key_schedule)?;
    let sealed = out.with_extension("age");
    destination.download(&destination.dump_path(&manifest.backup), &sealed).await?;
    let (size, sha256) = sha256_file(&sealed)?;
    if i64::try_from(size).ok() != Some(manifest.size_bytes) || sha256 != manifest.sha256 {
        let _ = std::fs::remove_file(&sealed);
        return Err(AgentError::Integrity {
            backup: manifest.backup.clone(),
            message: format!(
                "the stored dump is {size} bytes with SHA-256 {sha256}; the manifest says {} bytes with {}",
                manifest.size_bytes, manifest.sha256
            ),
        });
    }
    let decrypted = decrypt_file(&sealed, out, key, &manifest.backup);
    let _ = std::fs::remove_file(&sealed);
    if decrypted.is_err() {
        let _ = std::fs::remove_file(out);
    }
    decrypted?;
    if let Some(path) = manifest_out {
        let body = serde_json::to_vec_pretty(&manifest).map_err(|e| AgentError::Invalid(e.to_string()))?;
        std::fs::write(path, body).map_err(file_error("writing", path))?;
    }
    Ok(manifest)
}

/// `backup-agent verify`.
pub fn verify(args: &VerifyArgs) -> Result<DrillReport, AgentError> {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(&args.manifest).map_err(file_error("reading", &args.manifest))?)
            .map_err(|e| AgentError::Invalid(format!("{}: {e}", args.manifest.display())))?;
    let restored = std::fs::read_to_string(&args.counts).map_err(file_error("reading", &args.counts))?;
    let restored =
        parse_counts(&restored).map_err(|e| AgentError::Invalid(format!("{}: {e}", args.counts.display())))?;
    let millis = std::fs::read_to_string(&args.restore_millis).map_err(file_error("reading", &args.restore_millis))?;
    let millis: u64 = millis.trim().parse().map_err(|_| {
        AgentError::Invalid(format!("{}: {millis:?} is not milliseconds", args.restore_millis.display()))
    })?;
    compare(&manifest, &restored)?;
    Ok(DrillReport {
        backup: manifest.backup.clone(),
        duration_seconds: millis as f64 / 1000.0,
        finished_at: Timestamp::now(),
        tables: manifest.tables.len(),
        rows: manifest.tables.values().sum(),
    })
}

/// Every table of the manifest is in the restored database with the same
/// number of rows.
pub fn compare(manifest: &Manifest, restored: &BTreeMap<String, u64>) -> Result<(), AgentError> {
    let mismatches: Vec<String> = manifest
        .tables
        .iter()
        .filter_map(|(table, rows)| match restored.get(table) {
            None => Some(format!("{table} missing")),
            Some(got) if got != rows => Some(format!("{table}: {rows} rows in the backup, {got} restored")),
            Some(_) => None,
        })
        .collect();
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(AgentError::Mismatch { backup: manifest.backup.clone(), mismatches: mismatches.join("; ") })
    }
}
