//! `fhir-operator restore`: a real recovery. Fetches a backup (the latest
//! by default), checks and decrypts it into a private temporary directory,
//! runs `pg_restore` into the database the user names, then checks that
//! every table holds the rows the manifest recorded. The same steps as a
//! restore drill, in one process on the operator's workstation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use zeroize::Zeroizing;

use super::agent::{self, AgentError, Keys, PolicyArgs};
use super::job::COUNT_QUERY;
use super::manifest::parse_counts;
use super::store::DestinationArgs;

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub destination: DestinationArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// The backup to restore (default: the latest).
    #[arg(long)]
    pub backup: Option<String>,
    /// Read the keys from this Secret of the KeyRotationSchedule (in
    /// --namespace), through the current kubeconfig; they stay in memory.
    #[arg(long, value_name = "SECRET", required_unless_present = "keys", conflicts_with = "keys")]
    pub key_secret: Option<String>,
    /// Read the keys from a directory of `vN.key` files instead.
    #[arg(long, value_name = "DIR")]
    pub keys: Option<PathBuf>,
    /// The target database: a libpq connection string or URI, e.g.
    /// `host=db.example port=5432 dbname=fhir_restored user=fhir`. It
    /// should be empty: pg_restore stops at the first error.
    #[arg(long, value_name = "CONNINFO")]
    pub target: String,
    #[arg(long, default_value = "pg_restore")]
    pub pg_restore: PathBuf,
    #[arg(long, default_value = "psql")]
    pub psql: PathBuf,
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Restored {
    pub backup: String,
    pub key_version: i64,
    pub tables: usize,
    pub rows: u64,
    pub restore_seconds: f64,
}

pub async fn restore(args: &RestoreArgs) -> Result<Restored, AgentError> {
    let keys = match (&args.keys, &args.key_secret) {
        (Some(dir), _) => Keys::from_dir(dir)?,
        (None, Some(secret)) => keys_from_secret(&args.policy.namespace, secret).await?,
        (None, None) => return Err(AgentError::Invalid("one of --key-secret or --keys is required".into())),
    };
    let scratch = tempfile::Builder::new().prefix("fhir-restore-").tempdir().map_err(|source| AgentError::File {
        what: "creating a temporary directory",
        path: "$TMPDIR".into(),
        source,
    })?;
    let dump = scratch.path().join("dump");
    let manifest =
        agent::fetch_with(&args.destination, &args.policy, args.backup.as_deref(), &keys, &dump, None).await?;
    eprintln!(
        "fetched backup {} ({} bytes, key version {}); restoring into the target",
        manifest.backup, manifest.size_bytes, manifest.encryption.key_version
    );
    let started = Instant::now();
    let output = tokio::process::Command::new(&args.pg_restore)
        .args(["--exit-on-error", "--no-owner", "--no-privileges", "--dbname"])
        .arg(&args.target)
        .arg(&dump)
        .output()
        .await
        .map_err(|e| AgentError::Command(format!("running {}: {e}", args.pg_restore.display())))?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&dump);
    if !output.status.success() {
        return Err(AgentError::Command(format!(
            "pg_restore of backup {} failed ({}): {}",
            manifest.backup,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let restored = count_rows(&args.psql, &args.target).await?;
    agent::compare(&manifest, &restored)?;
    Ok(Restored {
        backup: manifest.backup.clone(),
        key_version: manifest.encryption.key_version,
        tables: manifest.tables.len(),
        rows: manifest.tables.values().sum(),
        restore_seconds: seconds,
    })
}

/// Rows per table of the database at `target`, through psql.
pub async fn count_rows(psql: &std::path::Path, target: &str) -> Result<BTreeMap<String, u64>, AgentError> {
    let output = tokio::process::Command::new(psql)
        .args(["--no-psqlrc", "--quiet", "--tuples-only", "--no-align", "--field-separator=\t", "--dbname"])
        .arg(target)
        .arg("--command")
        .arg(COUNT_QUERY)
        .output()
        .await
        .map_err(|e| AgentError::Command(format!("running {}: {e}", psql.display())))?;
    if !output.status.success() {
        return Err(AgentError::Command(format!(
            "counting rows with psql failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    parse_counts(&String::from_utf8_lossy(&output.stdout)).map_err(|e| AgentError::Invalid(format!("psql output: {e}")))
}

async fn keys_from_secret(namespace: &str, name: &str) -> Result<Keys, AgentError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| AgentError::Keys(format!("connecting to Kubernetes to read Secret {namespace}/{name}: {e}")))?;
    let secret = Api::<Secret>::namespaced(client, namespace)
        .get(name)
        .await
        .map_err(|e| AgentError::Keys(format!("reading Secret {namespace}/{name}: {e}")))?;
    let entries: BTreeMap<String, Zeroizing<Vec<u8>>> =
        secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, Zeroizing::new(v.0))).collect();
    Keys::from_entries(&entries, &format!("Secret {namespace}/{name}"))
}
