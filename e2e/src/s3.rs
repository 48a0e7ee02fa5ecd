//! A real S3-compatible server for the backup tests: s3s-fs (crates.io,
//! built into the cache by `e2e/s3s.sh`) on a loopback port, storing
//! objects as files in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct S3Server {
    /// Owned by the test process: it dies with it.
    pid: u32,
    root: tempfile::TempDir,
    port: u16,
    bucket: String,
    access_key: String,
    secret_key: String,
}

/// The s3s-fs binary, built by `e2e/s3s.sh` when missing.
pub fn binary() -> Result<PathBuf> {
    crate::installed_path("s3s.sh", "cannot build the S3 server s3s-fs (cargo install from the crates registry)")
}

impl S3Server {
    /// Starts a server with one empty bucket.
    pub fn start(bucket: &str) -> Result<Self> {
        let binary = binary()?;
        let root = tempfile::Builder::new().prefix("fhir-s3-").tempdir()?;
        std::fs::create_dir(root.path().join(bucket))?;
        let port = crate::postgres::free_port()?;
        let access_key = "fhir-backup-agent".to_owned();
        let secret_key = format!("s3-secret-{}", std::process::id());
        let mut command = Command::new(&binary);
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let pid = crate::control_plane::spawn_owned("s3s-fs", command)
            .with_context(|| format!("starting {}", binary.display()))?;
        let server = S3Server { pid, root, port, bucket: bucket.to_owned(), access_key, secret_key };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("s3s-fs did not listen on 127.0.0.1:{port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The agent's environment for this server's access key and `secret`
    /// (the right one, or not).
    pub fn credentials<'a>(&'a self, secret: &'a str) -> [(&'a str, &'a str); 2] {
        [("AWS_ACCESS_KEY_ID", &self.access_key), ("AWS_SECRET_ACCESS_KEY", secret)]
    }

    /// The file s3s-fs keeps the object `key` in (to tamper with it).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.path().join(&self.bucket).join(key)
    }

    /// Keys of the objects in the bucket (s3s-fs keeps each as a file).
    pub fn objects(&self) -> Vec<String> {
        let bucket = self.root.path().join(&self.bucket);
        let mut keys = Vec::new();
        collect(&bucket, &bucket, &mut keys);
        keys.sort();
        keys
    }
}

fn collect(base: &Path, dir: &Path, keys: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect(base, &path, keys);
        } else if let Ok(relative) = path.strip_prefix(base) {
            keys.push(relative.to_string_lossy().into_owned());
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        crate::control_plane::stop_owned("s3s-fs", self.pid);
    }
}
