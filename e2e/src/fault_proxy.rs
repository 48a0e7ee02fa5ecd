//! A TCP proxy on loopback that injects network faults between the
//! operator and the API server: it passes bytes through, drops every open
//! connection on demand, or turns into a blackhole that accepts connections
//! and never sends a byte (a peer that hangs without closing). TLS passes
//! through untouched: the API server's certificate names 127.0.0.1, which
//! the proxy listens on too.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};

#[derive(Default)]
struct State {
    blackhole: AtomicBool,
    stopped: AtomicBool,
    /// Every socket the proxy holds open, both sides of each connection.
    sockets: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
}

impl State {
    fn hold(&self, socket: &TcpStream) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        if let (Ok(clone), Ok(mut sockets)) = (socket.try_clone(), self.sockets.lock()) {
            sockets.insert(id, clone);
        }
        id
    }

    fn release(&self, ids: &[u64]) {
        if let Ok(mut sockets) = self.sockets.lock() {
            for id in ids {
                sockets.remove(id);
            }
        }
    }
}

/// The running proxy; stops (and closes every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
}

impl FaultProxy {
    /// Listens on a free loopback port, forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fault proxy")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let accept_state = state.clone();
        thread::Builder::new().name("fault-proxy".into()).spawn(move || {
            for client in listener.incoming() {
                if accept_state.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let id = accept_state.hold(&client);
                if accept_state.blackhole.load(Ordering::SeqCst) {
                    // Held open, never answered.
                    continue;
                }
                let state = accept_state.clone();
                thread::spawn(move || {
                    let _ = forward(client, upstream, &state);
                    state.release(&[id]);
                });
            }
        })?;
        Ok(Self { addr, state })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes every open connection, both ways.
    pub fn drop_connections(&self) {
        let sockets = self.state.sockets.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        for socket in sockets.into_values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// From now on, new connections are accepted and never answered.
    /// Connections already blackholed stay silent after [`Self::heal`], as
    /// they would behind a dropped route: only new ones pass again.
    pub fn blackhole(&self) {
        self.state.blackhole.store(true, Ordering::SeqCst);
    }

    /// New connections pass through again.
    pub fn heal(&self) {
        self.state.blackhole.store(false, Ordering::SeqCst);
    }

    /// A copy of `kubeconfig` whose server is this proxy, written to `out`.
    pub fn kubeconfig(&self, kubeconfig: &Path, upstream_port: u16, out: &Path) -> Result<()> {
        let text = std::fs::read_to_string(kubeconfig).with_context(|| format!("reading {}", kubeconfig.display()))?;
        let from = format!("server: https://127.0.0.1:{upstream_port}");
        anyhow::ensure!(text.contains(&from), "{} does not name {from}", kubeconfig.display());
        std::fs::write(out, text.replace(&from, &format!("server: https://127.0.0.1:{}", self.port())))?;
        Ok(())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        // Wake the acceptor so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        self.drop_connections();
    }
}

fn forward(client: TcpStream, upstream: SocketAddr, state: &State) -> io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    let id = state.hold(&server);
    let (mut client_read, mut server_write) = (client.try_clone()?, server.try_clone()?);
    let up = thread::spawn(move || {
        let _ = io::copy(&mut client_read, &mut server_write);
        let _ = server_write.shutdown(Shutdown::Write);
    });
    let (mut server_read, mut client_write) = (server, client);
    let _ = io::copy(&mut server_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Write);
    let _ = up.join();
    state.release(&[id]);
    Ok(())
}
