//! Where backups live: a directory (a mounted PersistentVolumeClaim) or an
//! S3-compatible bucket, behind one `object_store` interface. Layout under
//! the root (the PVC path or the S3 prefix):
//! `<namespace>/<policy>/<backup>.dump.age` and, written last,
//! `<namespace>/<policy>/<backup>.manifest.json`.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::manifest::{DUMP_SUFFIX, MANIFEST_SUFFIX, Manifest};

/// Environment variables the agent reads S3 credentials from (the Job sets
/// them from the policy's credentials Secret).
pub const ACCESS_KEY_ENV: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_KEY_ENV: &str = "AWS_SECRET_ACCESS_KEY";

/// Where to write, as flags of the agent and of `fhir-operator restore`.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(skip)]
pub struct DestinationArgs {
    /// A directory (the mounted PersistentVolumeClaim, with its path).
    #[arg(long, value_name = "DIR", required_unless_present = "s3_bucket", conflicts_with = "s3_bucket")]
    pub dir: Option<std::path::PathBuf>,
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

/// An opened destination, for one policy.
pub struct Destination {
    store: Arc<dyn ObjectStore>,
    /// `<root>/<namespace>/<policy>`.
    base: Path,
    describe: String,
    /// Values that must never appear in an error message.
    secrets: Vec<String>,
}

impl Destination {
    pub fn open(args: &DestinationArgs, namespace: &str, policy: &str) -> Result<Self, StoreError> {
        let (store, root, describe, secrets): (Arc<dyn ObjectStore>, String, String, Vec<String>) =
            match (&args.dir, &args.s3_bucket) {
                (Some(dir), _) => {
                    let describe = format!("directory {}", dir.display());
                    std::fs::create_dir_all(dir).map_err(|e| StoreError {
                        destination: describe.clone(),
                        what: "creating it".into(),
                        message: e.to_string(),
                    })?;
                    let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| StoreError {
                        destination: describe.clone(),
                        what: "opening it".into(),
                        message: e.to_string(),
                    })?;
                    (Arc::new(store), String::new(), describe, Vec::new())
                }
                (None, Some(bucket)) => {
                    let describe = match &args.s3_endpoint {
                        Some(endpoint) => format!("s3 bucket {bucket} at {endpoint}"),
                        None => format!("s3 bucket {bucket}"),
                    };
                    let access = std::env::var(ACCESS_KEY_ENV).unwrap_or_default();
                    let secret = std::env::var(SECRET_KEY_ENV).unwrap_or_default();
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
                    (Arc::new(store), args.s3_prefix.trim_matches('/').to_owned(), describe, vec![secret])
                }
                (None, None) => {
                    return Err(StoreError {
                        destination: "no destination".into(),
                        what: "arguments".into(),
                        message: "one of --dir or --s3-bucket is required".into(),
                    });
                }
            };
        let base = Path::from_iter(root.split('/').chain([namespace, policy]).filter(|p| !p.is_empty()));
        Ok(Destination { store, base, describe, secrets })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn error(&self, what: impl Into<String>, error: impl std::fmt::Display) -> StoreError {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        StoreError {
            destination: self.describe.clone(),
            what: what.into(),
            message: redact(&error.to_string(), &secrets),
        }
    }

    pub fn dump_path(&self, backup: &str) -> Path {
        self.base.clone().join(format!("{backup}{DUMP_SUFFIX}"))
    }

    pub fn manifest_path(&self, backup: &str) -> Path {
        self.base.clone().join(format!("{backup}{MANIFEST_SUFFIX}"))
    }

    /// Uploads a local file (multipart for large ones).
    pub async fn upload(&self, from: &std::path::Path, to: &Path) -> Result<(), StoreError> {
        use tokio::io::AsyncWriteExt;
        let mut file =
            tokio::fs::File::open(from).await.map_err(|e| self.error(format!("reading {}", from.display()), e))?;
        let mut writer = object_store::buffered::BufWriter::new(self.store.clone(), to.clone());
        let copied = tokio::io::copy(&mut file, &mut writer).await;
        if let Err(e) = copied {
            let _ = writer.abort().await;
            return Err(self.error(format!("writing {to}"), e));
        }
        writer.shutdown().await.map_err(|e| self.error(format!("writing {to}"), e))
    }

    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let path = self.manifest_path(&manifest.backup);
        let body = serde_json::to_vec_pretty(manifest).map_err(|e| self.error("encoding the manifest", e))?;
        self.store.put(&path, PutPayload::from(body)).await.map_err(|e| self.error(format!("writing {path}"), e))?;
        Ok(())
    }

    /// Downloads an object into a local file.
    pub async fn download(&self, from: &Path, to: &std::path::Path) -> Result<(), StoreError> {
        use tokio::io::AsyncWriteExt;
        let result = self.store.get(from).await.map_err(|e| self.error(format!("reading {from}"), e))?;
        let mut stream = result.into_stream();
        let mut file = private_file(to).await.map_err(|e| self.error(format!("creating {}", to.display()), e))?;
        while let Some(chunk) = stream.try_next().await.map_err(|e| self.error(format!("reading {from}"), e))? {
            file.write_all(&chunk).await.map_err(|e| self.error(format!("writing {}", to.display()), e))?;
        }
        file.flush().await.map_err(|e| self.error(format!("writing {}", to.display()), e))
    }

    /// Every complete backup of the policy (those with a manifest).
    pub async fn manifests(&self) -> Result<Vec<Manifest>, StoreError> {
        let listed: Vec<_> = self
            .store
            .list(Some(&self.base))
            .try_collect()
            .await
            .map_err(|e| self.error(format!("listing {}", self.base), e))?;
        let mut manifests = Vec::new();
        for object in listed.iter().filter(|o| o.location.as_ref().ends_with(MANIFEST_SUFFIX)) {
            let body = self
                .store
                .get(&object.location)
                .await
                .map_err(|e| self.error(format!("reading {}", object.location), e))?
                .bytes()
                .await
                .map_err(|e| self.error(format!("reading {}", object.location), e))?;
            let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| {
                self.error(format!("reading {}", object.location), format!("not a backup manifest: {e}"))
            })?;
            manifests.push(manifest);
        }
        Ok(manifests)
    }

    /// Removes a backup: the manifest first, so that a half-removed backup
    /// is never listed as complete.
    pub async fn remove(&self, backup: &str) -> Result<(), StoreError> {
        for path in [self.manifest_path(backup), self.dump_path(backup)] {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(format!("deleting {path}"), e)),
            }
        }
        Ok(())
    }
}

/// Creates a file only its owner can read.
pub async fn private_file(path: &std::path::Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).await
}

/// `text` with every non-empty secret replaced.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    secrets.iter().filter(|s| !s.is_empty()).fold(text.to_owned(), |t, s| t.replace(s, "[redacted]"))
}
