//! A userspace delay relay (for kernels without sch_netem).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a [`Relay`] does with the packets it carries towards the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    Pass,
    /// Every datagram towards the host is held this long (order kept).
    Delay(Duration),
}

/// A UDP relay between the coordinator and one agent, bound in the coordinator's namespace:
/// the inventory dials `listen`, the relay forwards to `target` and back. Only the direction
/// towards the agent is delayed, as `tc netem` on the bridge port would.
#[derive(Debug)]
pub struct Relay {
    pub listen: SocketAddr,
    pub target: SocketAddr,
    mode: Arc<Mutex<RelayMode>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds a UDP socket inside a namespace. The library cannot enter namespaces itself (that needs
/// `setns`, which its `nix` build leaves out), so the test provides this.
pub type UdpBinder = fn(ns: &str, addr: SocketAddr) -> std::io::Result<std::net::UdpSocket>;

impl Relay {
    /// Starts relaying between `down` (the address the coordinator dials) and `up` (a socket
    /// that reaches `target`). Must be called inside a tokio runtime.
    pub fn start(
        down: std::net::UdpSocket,
        up: std::net::UdpSocket,
        target: SocketAddr,
    ) -> anyhow::Result<Relay> {
        down.set_nonblocking(true)?;
        up.set_nonblocking(true)?;
        let listen = down.local_addr()?;
        let down = Arc::new(tokio::net::UdpSocket::from_std(down)?);
        let up = Arc::new(tokio::net::UdpSocket::from_std(up)?);
        let mode = Arc::new(Mutex::new(RelayMode::Pass));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let towards_host = {
            let (down, mode, client) = (down.clone(), mode.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = down.recv_from(&mut buf).await {
                    *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                    let hold = match *mode.lock().unwrap_or_else(|e| e.into_inner()) {
                        RelayMode::Pass => Duration::ZERO,
                        RelayMode::Delay(d) => d,
                    };
                    if tx
                        .send((tokio::time::Instant::now() + hold, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            })
        };
        let sender = {
            let up = up.clone();
            tokio::spawn(async move {
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    let _ = up.send_to(&bytes, target).await;
                }
            })
        };
        let back = {
            let (down, up, client) = (down.clone(), up.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = up.recv_from(&mut buf).await {
                    if from != target {
                        continue;
                    }
                    let to = *client.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(to) = to {
                        let _ = down.send_to(&buf[..n], to).await;
                    }
                }
            })
        };
        Ok(Relay {
            listen,
            target,
            mode,
            tasks: vec![towards_host, sender, back],
        })
    }

    pub fn set(&self, mode: RelayMode) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
