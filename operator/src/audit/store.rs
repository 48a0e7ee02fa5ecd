//! Where the trail goes: the shared destination (`crate::storage`: a
//! directory or S3), laid out as
//! `<root>/<stream>/segments/<first time>-<first seq>.jsonl` and
//! `<root>/<stream>/checkpoints/<index>.json`, one stream per sidecar.

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use super::checkpoint::{CHECKPOINTS_DIR, SignedCheckpoint, checkpoint_name, index_of};
use crate::storage::Opened;
pub use crate::storage::{DestinationArgs, StoreError};

pub struct AuditStore {
    opened: Opened,
}

impl AuditStore {
    pub fn open(args: &DestinationArgs) -> Result<Self, StoreError> {
        Ok(AuditStore { opened: crate::storage::open(args)? })
    }

    /// [`AuditStore::open`] with S3 credentials given rather than from the
    /// environment (the operator, reading many endpoints' trails).
    pub fn open_with(args: &DestinationArgs, credentials: (String, String)) -> Result<Self, StoreError> {
        Ok(AuditStore { opened: crate::storage::open_with(args, credentials)? })
    }

    pub fn describe(&self) -> &str {
        &self.opened.describe
    }

    fn path(&self, stream: &str, name: &str) -> Path {
        let mut path = self.opened.root.clone().join(stream);
        for part in name.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    /// Writes an object; in a directory it is also synced to disk before
    /// this returns (the sidecar moves its offset only afterwards).
    pub async fn put(&self, stream: &str, name: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let path = self.path(stream, name);
        self.opened
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| self.opened.error(format!("writing {path}"), e))?;
        if let Some(dir) = &self.opened.dir {
            let file = dir.join(path.as_ref());
            let synced = std::fs::File::open(&file)
                .and_then(|f| f.sync_all())
                .and_then(|()| file.parent().map_or(Ok(()), |p| std::fs::File::open(p).and_then(|d| d.sync_all())));
            synced.map_err(|e| self.opened.error(format!("syncing {path}"), e))?;
        }
        Ok(())
    }

    pub async fn put_checkpoint(&self, signed: &SignedCheckpoint) -> Result<(), StoreError> {
        self.put(&signed.checkpoint.stream, &signed.checkpoint.object_name(), signed.to_bytes()).await
    }

    /// An object's bytes; `None` when it does not exist.
    pub async fn get(&self, stream: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(stream, name);
        match self.opened.store.get(&path).await {
            Ok(result) => {
                let bytes = result.bytes().await.map_err(|e| self.opened.error(format!("reading {path}"), e))?;
                Ok(Some(bytes.to_vec()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.opened.error(format!("reading {path}"), e)),
        }
    }

    pub async fn delete(&self, stream: &str, name: &str) -> Result<(), StoreError> {
        let path = self.path(stream, name);
        match self.opened.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.opened.error(format!("deleting {path}"), e)),
        }
    }

    /// Every object under `base`, as its path parts below `base`.
    async fn list_parts(&self, base: &Path) -> Result<Vec<Vec<String>>, StoreError> {
        let listed: Vec<_> = self
            .opened
            .store
            .list(Some(base))
            .try_collect()
            .await
            .map_err(|e| self.opened.error(format!("listing {base}"), e))?;
        Ok(listed
            .iter()
            .filter_map(|o| Some(o.location.prefix_match(base)?.map(|p| p.as_ref().to_owned()).collect()))
            .collect())
    }

    /// Names (relative to the stream, e.g. `segments/x.jsonl`) of every
    /// object of a stream, sorted.
    pub async fn list(&self, stream: &str) -> Result<Vec<String>, StoreError> {
        let base = self.opened.root.clone().join(stream);
        let mut names: Vec<String> = self.list_parts(&base).await?.iter().map(|parts| parts.join("/")).collect();
        names.sort();
        Ok(names)
    }

    /// The streams under the root: each directory holding checkpoints.
    pub async fn streams(&self) -> Result<Vec<String>, StoreError> {
        let mut streams: Vec<String> = self
            .list_parts(&self.opened.root)
            .await?
            .into_iter()
            .filter(|parts| parts.len() == 3 && parts[1] == CHECKPOINTS_DIR)
            .map(|mut parts| parts.swap_remove(0))
            .collect();
        streams.sort();
        streams.dedup();
        Ok(streams)
    }

    /// Every checkpoint object of a stream, by index: the index its name
    /// says, and its bytes.
    pub async fn checkpoints(&self, stream: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for name in self.list(stream).await? {
            if !name.starts_with(CHECKPOINTS_DIR) {
                continue;
            }
            let Some(index) = index_of(&name) else { continue };
            if let Some(bytes) = self.get(stream, &name).await? {
                out.push((index, bytes));
            }
        }
        out.sort_by_key(|(index, _)| *index);
        Ok(out)
    }

    /// The newest checkpoint of a stream that parses, if any.
    pub async fn newest_checkpoint(&self, stream: &str) -> Result<Option<SignedCheckpoint>, StoreError> {
        let names: Vec<String> =
            self.list(stream).await?.into_iter().filter(|n| n.starts_with(CHECKPOINTS_DIR)).collect();
        for name in names.iter().rev() {
            if let Some(bytes) = self.get(stream, name).await?
                && let Ok(signed) = serde_json::from_slice::<SignedCheckpoint>(&bytes)
            {
                return Ok(Some(signed));
            }
        }
        Ok(None)
    }

    pub fn checkpoint_name(index: u64) -> String {
        checkpoint_name(index)
    }
}
