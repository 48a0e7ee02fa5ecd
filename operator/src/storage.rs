//! A destination for what the operator keeps outside the cluster's API: a
//! directory (a mounted PersistentVolumeClaim) or an S3-compatible bucket,
//! behind one `object_store` interface. Shared by the backups
//! (`backup::store`) and the audit trail (`audit::store`), which each lay
//! out their own objects under the destination's root.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;

/// Environment variables S3 credentials are read from (a Job or a sidecar
/// sets them from the credentials Secret).
pub const ACCESS_KEY_ENV: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_KEY_ENV: &str = "AWS_SECRET_ACCESS_KEY";

/// Where to read and write, as command-line flags.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(skip)]
pub struct DestinationArgs {
    /// A directory (the mounted PersistentVolumeClaim, with its path).
    /// (One of `--dir` and `--s3-bucket` is required: [`open`] says so.)
    #[arg(long, value_name = "DIR", conflicts_with = "s3_bucket")]
    pub dir: Option<PathBuf>,
    /// An S3 bucket; credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long, value_name = "BUCKET")]
    pub s3_bucket: Option<String>,
    /// Key prefix in the bucket.
    #[arg(long, value_name = "PREFIX", default_value = "", requires = "s3_bucket")]
    pub s3_prefix: String,
    /// Endpoint URL of an S3-compatible service (default: AWS for the region).
    #[arg(long, value_name = "URL", requires = "s3_bucket")]
    pub s3_endpoint: Option<String>,
    #[arg(long, value_name = "REGION", requires = "s3_bucket")]
    pub s3_region: Option<String>,
}

/// Errors name the destination (directory or bucket) and the object,
/// never a credential.
#[derive(Debug, thiserror::Error)]
#[error("{destination}: {what}: {message}")]
pub struct StoreError {
    pub destination: String,
    pub what: String,
    pub message: String,
}

/// An opened destination.
pub struct Opened {
    pub store: Arc<dyn ObjectStore>,
    /// The S3 prefix, or the empty path for a directory.
    pub root: Path,
    /// `directory /x` or `s3 bucket b at http://...`: for messages.
    pub describe: String,
    /// The directory, for a directory destination: its writers may fsync.
    pub dir: Option<PathBuf>,
    /// Values that must never appear in an error message.
    secrets: Vec<String>,
}

impl Opened {
    /// An error about `what`, with every secret of the destination redacted.
    pub fn error(&self, what: impl Into<String>, error: impl std::fmt::Display) -> StoreError {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        StoreError {
            destination: self.describe.clone(),
            what: what.into(),
            message: redact(&error.to_string(), &secrets),
        }
    }
}

/// Opens the destination the flags name (a directory is created if missing);
/// S3 credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
pub fn open(args: &DestinationArgs) -> Result<Opened, StoreError> {
    let from_env =
        (std::env::var(ACCESS_KEY_ENV).unwrap_or_default(), std::env::var(SECRET_KEY_ENV).unwrap_or_default());
    open_with(args, from_env)
}

/// [`open`] with the S3 credentials given (access key id, secret key).
pub fn open_with(args: &DestinationArgs, credentials: (String, String)) -> Result<Opened, StoreError> {
    match (&args.dir, &args.s3_bucket) {
        (Some(dir), _) => {
            let describe = format!("directory {}", dir.display());
            let failed = |what: &str, e: std::io::Error| StoreError {
                destination: describe.clone(),
                what: what.into(),
                message: e.to_string(),
            };
            std::fs::create_dir_all(dir).map_err(|e| failed("creating it", e))?;
            let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| StoreError {
                destination: describe.clone(),
                what: "opening it".into(),
                message: e.to_string(),
            })?;
            Ok(Opened {
                store: Arc::new(store),
                root: Path::default(),
                describe,
                dir: Some(dir.clone()),
                secrets: Vec::new(),
            })
        }
        (None, Some(bucket)) => {
            let describe = match &args.s3_endpoint {
                Some(endpoint) => format!("s3 bucket {bucket} at {endpoint}"),
                None => format!("s3 bucket {bucket}"),
            };
            let (access, secret) = credentials;
            if access.is_empty() || secret.is_empty() {
                return Err(StoreError {
                    destination: describe,
                    what: "credentials".into(),
                    message: format!("{ACCESS_KEY_ENV} and {SECRET_KEY_ENV} must both be set"),
                });
            }
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_access_key_id(&access)
                .with_secret_access_key(&secret)
                .with_region(args.s3_region.clone().unwrap_or_else(|| "us-east-1".into()));
            if let Some(endpoint) = &args.s3_endpoint {
                builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
            }
            let store = builder.build().map_err(|e| StoreError {
                destination: describe.clone(),
                what: "configuring the client".into(),
                message: redact(&e.to_string(), &[&secret]),
            })?;
            let root = Path::from_iter(args.s3_prefix.split('/').filter(|p| !p.is_empty()));
            Ok(Opened { store: Arc::new(store), root, describe, dir: None, secrets: vec![secret] })
        }
        (None, None) => Err(StoreError {
            destination: "no destination".into(),
            what: "arguments".into(),
            message: "one of --dir or --s3-bucket is required".into(),
        }),
    }
}

/// `text` with every non-empty secret replaced.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    secrets.iter().filter(|s| !s.is_empty()).fold(text.to_owned(), |t, s| t.replace(s, "[redacted]"))
}
