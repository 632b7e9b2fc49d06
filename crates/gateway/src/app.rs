//! `Application`: builds everything from a `Config`, binds its own listener
//! (port 0 in tests) and serves until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Readiness;
use crate::proxy::Proxy;
use crate::router;
use crate::upstream::Upstream;

pub struct Application {
    listener: TcpListener,
    router: Router,
    readiness: Readiness,
    shutdown_grace: Duration,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let upstream = Upstream::new(&config.upstream)?;
        let proxy = Arc::new(Proxy {
            upstream,
            max_body_bytes: config.server.max_body_bytes,
            max_response_bytes: config.upstream.max_response_bytes,
        });
        let readiness = Readiness::default();
        let router = router::build(proxy, readiness.clone());
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
        Ok(Self { listener, router, readiness, shutdown_grace: config.server.shutdown_grace })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests and streams finish for up to `server.shutdown_grace`, and
    /// returns.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let addr = self.local_addr();
        let listener = self.listener.tap_io(|tcp| {
            // Small SSE frames must leave at once, not wait for Nagle.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let stop_accepting = CancellationToken::new();
        let server =
            axum::serve(listener, self.router).with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
        let mut server = std::pin::pin!(server.into_future());

        self.readiness.set(true);
        tracing::info!(%addr, "listening");

        tokio::select! {
            result = &mut server => return result.map_err(Into::into),
            () = shutdown => {}
        }

        self.readiness.set(false);
        stop_accepting.cancel();
        match tokio::time::timeout(self.shutdown_grace, server).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!(
                grace = ?self.shutdown_grace,
                "shutdown grace period over; closing the connections still open"
            ),
        }
        tracing::info!("stopped");
        Ok(())
    }
}
