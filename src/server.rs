//! Binding the DNS listeners: one UDP socket and one TCP listener per listen address, on the
//! same port (so `dig +tcp` finds the server where plain `dig` did, even with port 0).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::server::RequestHandler;
use thiserror::Error;
use tokio::net::{TcpListener, UdpSocket};
use tracing::{info, warn};

/// Per-connection buffer of responses waiting to be written, as hickory-server sizes it.
const TCP_RESPONSE_BUFFER: usize = 32;
/// How many times a port-0 bind retries when the UDP port it got is taken for TCP.
const SAME_PORT_ATTEMPTS: usize = 16;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({proto}): {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        source: std::io::Error,
    },
}

/// The running DNS server and the addresses it actually listens on.
pub struct DnsServer<H: RequestHandler> {
    server: Server<H>,
    local_addrs: Vec<SocketAddr>,
}

impl<H: RequestHandler> DnsServer<H> {
    /// Binds every address; any failure is returned before anything is served.
    pub async fn bind(listen: &[SocketAddr], handler: H, tcp_idle_timeout: Duration) -> Result<Self, ServerError> {
        let mut sockets = Vec::with_capacity(listen.len());
        for &addr in listen {
            if !addr.ip().is_loopback() {
                warn!(%addr, "listening on a non-loopback address: meshdns will answer (and forward for) other hosts");
            }
            sockets.push(bind_pair(addr).await?);
        }
        let mut server = Server::new(handler);
        let mut local_addrs = Vec::with_capacity(sockets.len());
        for (udp, tcp) in sockets {
            let addr = udp.local_addr().map_err(|source| ServerError::Bind {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                proto: "udp",
                source,
            })?;
            info!(%addr, "listening for DNS on UDP and TCP");
            local_addrs.push(addr);
            server.register_socket(udp);
            server.register_listener(tcp, tcp_idle_timeout, TCP_RESPONSE_BUFFER);
        }
        Ok(Self { server, local_addrs })
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Stops accepting and waits for the listeners to finish.
    pub async fn shutdown(mut self) {
        if let Err(error) = self.server.shutdown_gracefully().await {
            warn!(%error, "DNS server did not shut down cleanly");
        }
    }
}

async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), ServerError> {
    let err = |proto, source| ServerError::Bind { addr, proto, source };
    let attempts = if addr.port() == 0 { SAME_PORT_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr).await.map_err(|e| err("udp", e))?;
        let bound = udp.local_addr().map_err(|e| err("udp", e))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(err(
        "tcp",
        last.unwrap_or_else(|| std::io::Error::other("no attempt made")),
    ))
}
