//! Helpers shared by the tests that run real tools (nginx, openssl, curl).
// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A program the tests run, and the Debian package that installs it.
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub const NGINX: Tool = Tool { name: "nginx", package: "nginx" };
pub const CURL: Tool = Tool { name: "curl", package: "curl" };
pub const OPENSSL: Tool = Tool { name: "openssl", package: "openssl" };
pub const SETPRIV: Tool = Tool { name: "setpriv", package: "util-linux" };
pub const KILL: Tool = Tool { name: "kill", package: "procps" };
/// Argo CD runs health checks in gopher-lua, a Lua 5.1.
pub const LUA51: Tool = Tool { name: "lua5.1", package: "lua5.1" };
pub const LUA54: Tool = Tool { name: "lua5.4", package: "lua5.4" };

/// Finds a tool on PATH or in the sbin directories (nginx lives in
/// /usr/sbin, often not on a user's PATH); fails loudly when it is missing.
pub fn tool(tool: &Tool) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool.name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{}` is not installed and these tests need the real one: install the Debian package `{}` \
                 (apt-get install {})",
                tool.name, tool.package, tool.package
            )
        })
}

/// uid and gid of `nobody` on Debian.
pub const NOBODY: u32 = 65534;

pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A command for `program` that runs without privilege, as in the gateway's
/// pod: as nobody (via setpriv) when the tests run as root, else as the
/// current (unprivileged) user.
pub fn unprivileged(program: &Tool) -> Command {
    if !running_as_root() {
        return Command::new(tool(program));
    }
    let mut command = Command::new(tool(&SETPRIV));
    command.args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), "--clear-groups".into(), "--".into()]);
    command.arg(tool(program));
    command
}

/// A loopback port nobody listens on right now (the kernel picks it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind loopback").port()
}

/// How long any wait may take: for nginx to listen, a response, a log line or a datagram.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// nginx in the foreground, unprivileged, in its own process group; stopped
/// when dropped, even when an assertion fails.
pub struct Nginx {
    pub child: Child,
    stderr: PathBuf,
    /// Found before it is needed: a panic in `drop` would abort.
    kill: PathBuf,
}

impl Nginx {
    /// Starts nginx on `conf` (its stderr kept in `dir`) and waits until it
    /// listens on `port`.
    pub fn start(conf: &Path, dir: &Path, port: u16) -> Nginx {
        let stderr = dir.join("nginx.stderr");
        let child = unprivileged(&NGINX)
            .arg("-c")
            .arg(conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            // Its own process group, so that the workers can be stopped with it.
            .process_group(0)
            .spawn()
            .expect("start nginx");
        // The guard exists before the wait: a failed start still stops nginx.
        let mut nginx = Nginx { child, stderr, kill: tool(&KILL) };
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = nginx.child.try_wait().expect("nginx status") {
                panic!("nginx exited ({status}) before listening:\n{}", nginx.stderr());
            }
            assert!(Instant::now() < deadline, "nginx did not listen within {PATIENCE:?}:\n{}", nginx.stderr());
            thread::sleep(Duration::from_millis(20));
        }
        if running_as_root() {
            let master = std::fs::metadata(format!("/proc/{}", nginx.child.id())).expect("nginx's /proc entry");
            assert_eq!(master.uid(), NOBODY, "nginx runs unprivileged");
        }
        nginx
    }

    /// What nginx wrote to its error log (stderr).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM to the group (master and workers); KILL if it lingers.
        let group = format!("-{}", self.child.id());
        let _ = Command::new(&self.kill).args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new(&self.kill).args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}
