//! Where backups live: a directory (a mounted PersistentVolumeClaim) or an
//! S3-compatible bucket, behind one `object_store` interface. Layout under
//! the root (the PVC path or the S3 prefix):
//! `<namespace>/<policy>/<backup>.dump.age` and, written last,
//! `<namespace>/<policy>/<backup>.manifest.json`.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::manifest::{DUMP_SUFFIX, MANIFEST_SUFFIX, Manifest};
pub use crate::storage::{ACCESS_KEY_ENV, DestinationArgs, SECRET_KEY_ENV, StoreError, redact};

/// An opened destination, for one policy.
pub struct Destination {
    store: Arc<dyn ObjectStore>,
    /// `<root>/<namespace>/<policy>`.
    base: Path,
    opened: crate::storage::Opened,
}

impl Destination {
    pub fn open(args: &DestinationArgs, namespace: &str, policy: &str) -> Result<Self, StoreError> {
        let opened = crate::storage::open(args)?;
        let base = Path::from_iter(
            opened.root.as_ref().split('/').chain([namespace, policy]).filter(|p| !p.is_empty()).map(str::to_owned),
        );
        Ok(Destination { store: opened.store.clone(), base, opened })
    }

    pub fn describe(&self) -> &str {
        &self.opened.describe
    }

    fn error(&self, what: impl Into<String>, error: impl std::fmt::Display) -> StoreError {
        self.opened.error(what, error)
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
