//! A real PostgreSQL server from Debian's packages for the backup tests:
//! `initdb` into a temporary directory, the server on a loopback port, owned
//! by the test process (it dies with it) and stopped on drop. As root, the server runs as Debian's `postgres` user (initdb
//! refuses root).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
    pid: u32,
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
        // The server itself, not `pg_ctl start` (which detaches it): owned by
        // the test process, it dies with it however the test ends.
        let mut server = Command::new(bin_dir()?.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", &format!("port={port}"), "-c", "fsync=off"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().join("socket").display()))
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGDATABASE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("postgres.log"))?);
        if is_root() {
            let (uid, gid) = postgres_ids()?;
            // Switch user in the child itself (runuser would fork, and the
            // death signal would reach only runuser).
            // SAFETY: setgid, setgroups and setuid are async-signal-safe.
            unsafe {
                server.pre_exec(move || {
                    if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let pid = crate::control_plane::spawn_owned("postgres", server)?;
        let pg = Postgres { dir, port, pid };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while pg.sql("postgres", "SELECT 1").is_err() {
            if std::time::Instant::now() > deadline || !crate::control_plane::owned_alive("postgres", pid) {
                let log = std::fs::read_to_string(pg.dir.path().join("postgres.log")).unwrap_or_default();
                bail!("PostgreSQL did not start within 30 s; its log:\n{log}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(pg)
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

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        crate::control_plane::stop_owned("postgres", self.pid);
    }
}

/// Debian's `postgres` user and group.
fn postgres_ids() -> Result<(libc::uid_t, libc::gid_t)> {
    // SAFETY: getpwnam with a NUL-terminated name; the result is read at once.
    unsafe {
        let pw = libc::getpwnam(c"postgres".as_ptr());
        if pw.is_null() {
            bail!("no `postgres` user: install Debian's `postgresql` package");
        }
        Ok(((*pw).pw_uid, (*pw).pw_gid))
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
