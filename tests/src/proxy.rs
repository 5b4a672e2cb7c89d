//! A TCP proxy on loopback that the fault scenarios put between a sidecar and Redis or
//! PostgreSQL (`tc netem` is not available on these kernels). It forwards bytes as they are, or
//! delays them, black-holes them, refuses new connections, resets every open connection, or lets
//! requests through and cuts the connection on the first reply (the server acted, the client
//! never learns the outcome: a cut during COMMIT).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes flow through.
    Pass,
    /// Every chunk waits this long before it is forwarded, in both directions.
    Latency(Duration),
    /// Nothing is forwarded and nothing is closed: connections (old and new) hang until the mode
    /// changes, then what was held flows (as TCP retransmission would deliver it).
    BlackHole,
    /// New connections are reset at once (the server is down); open ones keep working.
    Refuse,
    /// Requests reach the server; the first reply on a connection resets it instead.
    CutReplies,
}

struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped by `reset_all`: every connection open at that moment is reset.
    resets: watch::Sender<u64>,
}

pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `upstream` (`127.0.0.1:port`).
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            upstream,
            mode: watch::Sender::new(Mode::Pass),
            resets: watch::Sender::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Self {
            port,
            shared,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn set(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Resets (RST) every connection open now; new ones follow the mode.
    pub fn reset_all(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            if *shared.mode.borrow() == Mode::Refuse {
                return reset(&client);
            }
            // A black hole swallows the connection attempt too: hold it until the mode changes.
            let mut mode = shared.mode.subscribe();
            let mut resets = shared.resets.subscribe();
            while *mode.borrow_and_update() == Mode::BlackHole {
                tokio::select! {
                    _ = mode.changed() => {}
                    _ = resets.changed() => return reset(&client),
                }
            }
            match TcpStream::connect(shared.upstream).await {
                Ok(server) => {
                    let _ = server.set_nodelay(true);
                    pump(client, server, &shared).await;
                }
                Err(_) => reset(&client),
            }
        });
    }
}

fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

enum End {
    Closed,
    Reset,
}

/// Forwards both ways until one side closes, a reset is asked for, or the mode cuts it.
async fn pump(mut client: TcpStream, mut server: TcpStream, shared: &Shared) {
    let mut mode = shared.mode.subscribe();
    let mut resets = shared.resets.subscribe();
    resets.mark_unchanged();
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
        loop {
            // Which way the chunk goes, and how many bytes.
            let (to_server, n) = tokio::select! {
                r = cr.read(&mut up) => (true, r.unwrap_or(0)),
                r = sr.read(&mut down) => (false, r.unwrap_or(0)),
                _ = resets.changed() => break End::Reset,
            };
            if n == 0 {
                break End::Closed;
            }
            // Apply the mode in force now; a black hole holds the chunk until it ends.
            let current = loop {
                let m = *mode.borrow_and_update();
                if m != Mode::BlackHole {
                    break Some(m);
                }
                tokio::select! {
                    _ = mode.changed() => {}
                    _ = resets.changed() => break None,
                }
            };
            let Some(current) = current else {
                break End::Reset;
            };
            match current {
                Mode::CutReplies if !to_server => break End::Reset,
                Mode::Latency(d) => tokio::time::sleep(d).await,
                _ => {}
            }
            let written = if to_server {
                sw.write_all(&up[..n]).await
            } else {
                cw.write_all(&down[..n]).await
            };
            if written.is_err() {
                break End::Reset;
            }
        }
    };
    match end {
        End::Reset => {
            reset(&client);
            reset(&server);
        }
        End::Closed => {
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
        }
    }
}
