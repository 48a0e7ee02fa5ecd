//! A real PostgreSQL server from Debian's packages for the backup tests:
//! `initdb` into a temporary directory, `pg_ctl` on a loopback port, stopped
//! on drop. As root, the server runs as Debian's `postgres` user (initdb
//! refuses root).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// Debian's PostgreSQL binaries (initdb, pg_ctl, pg_dump, ...): the newest
/// `/usr/lib/postgresql/<major>/bin`.
pub fn bin_dir() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context(
            "PostgreSQL is not installed: /usr/lib/postgresql is missing. \
             Install Debian's `postgresql` package (bash .ci/run does)",
        )?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").is_file())
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .context("no /usr/lib/postgresql/<major>/bin/initdb: install Debian's `postgresql` package")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command run as the server's user: `postgres` when the tests run as
/// root, the current user otherwise. `PATH` starts with [`bin_dir`].
pub fn server_command(program: &str) -> Result<Command> {
    let bin = bin_dir()?;
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "env", &format!("PATH={path}"), program]);
        c
    } else {
        let mut c = Command::new(bin.join(program));
        c.env("PATH", &path);
        c
    };
    command.env_remove("PGHOST").env_remove("PGPORT").env_remove("PGDATABASE");
    Ok(command)
}

/// Makes `dir` (and its parents up to the temporary root) usable by the
/// server's user.
pub fn hand_over(dir: &Path) -> Result<()> {
    if is_root() {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status()?;
        if !status.success() {
            bail!("chown postgres {}: {status}", dir.display());
        }
    }
    Ok(())
}

/// A running server on 127.0.0.1.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Postgres {
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fhir-pg-").tempdir()?;
        std::fs::create_dir(dir.path().join("socket"))?;
        hand_over(dir.path())?;
        let data = dir.path().join("data");
        run(server_command("initdb")?
            .args(["--username=postgres", "--auth=trust", "--no-sync", "--pgdata"])
            .arg(&data))
        .context("initdb")?;
        let port = free_port()?;
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} -c fsync=off",
            dir.path().join("socket").display()
        );
        run(server_command("pg_ctl")?
            .args(["--wait", "--options", &options, "--log"])
            .arg(dir.path().join("postgres.log"))
            .arg("--pgdata")
            .arg(&data)
            .arg("start"))
        .with_context(|| format!("pg_ctl start (log: {})", dir.path().join("postgres.log").display()))?;
        Ok(Postgres { dir, port })
    }

    /// Environment for libpq clients (pg_dump, psql) to reach `database`.
    pub fn env(&self, database: &str) -> Vec<(String, String)> {
        [
            ("PGHOST", "127.0.0.1".to_owned()),
            ("PGPORT", self.port.to_string()),
            ("PGDATABASE", database.to_owned()),
            ("PGUSER", "postgres".to_owned()),
            ("PGSSLMODE", "disable".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// A libpq connection string for `database`.
    pub fn conninfo(&self, database: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={database} sslmode=disable", self.port)
    }

    /// Runs SQL in `database`; returns psql's unaligned output.
    pub fn sql(&self, database: &str, sql: &str) -> Result<String> {
        let out = run(Command::new(bin_dir()?.join("psql"))
            .args(["--no-psqlrc", "--quiet", "--tuples-only", "--no-align", "-v", "ON_ERROR_STOP=1", "--dbname"])
            .arg(self.conninfo(database))
            .arg("--command")
            .arg(sql))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn create_database(&self, name: &str) -> Result<()> {
        self.sql("postgres", &format!("CREATE DATABASE {name}")).map(|_| ())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Ok(mut stop) = server_command("pg_ctl") {
            let _ = stop
                .args(["--mode=immediate", "--wait", "--pgdata"])
                .arg(self.dir.path().join("data"))
                .arg("stop")
                .output();
        }
    }
}

/// Runs a command; an error carries its stderr.
pub fn run(command: &mut Command) -> Result<Output> {
    let out = command.output().with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
