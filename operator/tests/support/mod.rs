//! Helpers shared by the tests that run real tools (nginx, openssl, curl).
// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

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
