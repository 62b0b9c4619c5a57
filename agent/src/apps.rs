//! The web apps this agent serves: one reverse proxy per app on its public address, kept for
//! the agent's lifetime. A deploy reserves the address early (so a port already taken fails the
//! deploy before anything runs) and installs the proxy when traffic first moves to the app.
//! Every proxy gets the agent's connection limits; their connection budget is shared. An app
//! whose spec listens on a wildcard address binds the agent's `[proxy] listen_ip` when one is
//! configured ([`public_addr`]), so agents sharing a machine serve one spec side by side.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::{ConnLimits, Proxy, StatsSnapshot, Upstream};

struct Served {
    listen: SocketAddr,
    proxy: Proxy,
    /// Stops this proxy's accept loop (when the app moves to another address).
    stop: CancellationToken,
}

/// Why an app cannot have its public address.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error("{listen} is already the public address of app {app} on this host")]
    OtherApp { listen: SocketAddr, app: String },
    #[error("cannot listen on {listen}: {err} (is another program using that port?)")]
    Bind {
        listen: SocketAddr,
        err: std::io::Error,
    },
}

/// What a deploy holds between validation and the switch: either the app's running proxy, or a
/// freshly bound listener for it.
#[derive(Debug)]
pub enum Reserved {
    Serving(Box<Proxy>),
    Bound(SocketAddr, TcpListener),
}

/// Live traffic of one app, for the health report.
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    pub listen: SocketAddr,
    pub release: String,
    pub stats: StatsSnapshot,
}

/// Where an app whose spec says `listen` is served: on `listen_ip` when `listen` is a
/// wildcard (`0.0.0.0`, `::`) and an IP is configured, else `listen` itself. The port is always
/// the spec's. Pure.
pub fn public_addr(listen: SocketAddr, listen_ip: Option<IpAddr>) -> SocketAddr {
    match listen_ip {
        Some(ip) if listen.ip().is_unspecified() => SocketAddr::new(ip, listen.port()),
        _ => listen,
    }
}

/// Every app proxy of this agent.
#[derive(Default)]
pub struct Apps {
    served: Mutex<HashMap<String, Served>>,
    limits: ConnLimits,
    /// `[proxy] listen_ip`: what a wildcard `web.listen` binds on this agent.
    listen_ip: Option<IpAddr>,
    /// Each proxy's accept loop is a part of the daemon the watchdog checks.
    liveness: drover_daemon::Liveness,
}

impl std::fmt::Debug for Apps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apps").finish_non_exhaustive()
    }
}

impl Apps {
    /// No app yet; every proxy made later gets `limits` (one shared connection budget).
    pub fn new(limits: ConnLimits) -> Apps {
        Apps {
            served: Mutex::default(),
            limits,
            listen_ip: None,
            liveness: drover_daemon::Liveness::default(),
        }
    }

    /// Binds apps whose spec listens on a wildcard address on `ip` instead (`[proxy]
    /// listen_ip`).
    pub fn with_listen_ip(mut self, ip: Option<IpAddr>) -> Apps {
        self.listen_ip = ip;
        self
    }

    /// The address an app whose spec says `listen` is served on by this agent.
    pub fn public_addr(&self, listen: SocketAddr) -> SocketAddr {
        public_addr(listen, self.listen_ip)
    }

    /// Registers each proxy's accept loop with `liveness` (the daemon's watchdog check).
    pub fn with_liveness(mut self, liveness: drover_daemon::Liveness) -> Apps {
        self.liveness = liveness;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The app's proxy, if it serves.
    pub fn proxy(&self, app: &str) -> Option<Proxy> {
        self.lock().get(app).map(|s| s.proxy.clone())
    }

    /// Makes sure `app` can serve on the address its spec's `listen` gives on this agent
    /// ([`Apps::public_addr`]): its running proxy if it is already there, otherwise a listener
    /// bound now. Another app on that address, or a port taken by another program, is an error
    /// that says so.
    pub async fn reserve(&self, app: &str, listen: SocketAddr) -> Result<Reserved, ReserveError> {
        let listen = self.public_addr(listen);
        {
            let served = self.lock();
            if let Some(s) = served.get(app)
                && s.listen == listen
            {
                return Ok(Reserved::Serving(Box::new(s.proxy.clone())));
            }
            if let Some((other, _)) = served.iter().find(|(a, s)| *a != app && s.listen == listen) {
                return Err(ReserveError::OtherApp {
                    listen,
                    app: other.clone(),
                });
            }
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|err| ReserveError::Bind { listen, err })?;
        Ok(Reserved::Bound(listen, listener))
    }

    /// Turns a reservation into the app's serving proxy. A new address replaces the app's old
    /// proxy, which stops accepting (connections it holds finish).
    pub fn install(&self, app: &str, reserved: Reserved, shutdown: &CancellationToken) -> Proxy {
        self.install_serving(app, reserved, None, shutdown)
    }

    /// Like [`Apps::install`], with `upstream` live before the first connection is accepted,
    /// so no request meets a proxy with nothing to serve (after an agent restart). A running
    /// proxy is switched to `upstream` unless it already serves that address and release.
    pub fn install_serving(
        &self,
        app: &str,
        reserved: Reserved,
        upstream: Option<Arc<Upstream>>,
        shutdown: &CancellationToken,
    ) -> Proxy {
        match reserved {
            Reserved::Serving(proxy) => {
                if let Some(next) = upstream {
                    let same = proxy
                        .upstream()
                        .is_some_and(|u| u.addr == next.addr && u.release == next.release);
                    if !same {
                        proxy.switch(next);
                    }
                }
                *proxy
            }
            Reserved::Bound(listen, listener) => {
                let proxy = Proxy::with_limits(self.limits.clone());
                if let Some(first) = upstream {
                    proxy.switch(first);
                }
                let stop = shutdown.child_token();
                let part = self.liveness.part_with_heartbeat(
                    format!("proxy of {app} on {listen}"),
                    drover_daemon::max_silence(),
                );
                let beat = part.heartbeat();
                tokio::spawn(drover_daemon::tracked(
                    part,
                    proxy
                        .clone()
                        .serve_beating(listener, stop.clone(), Some(beat)),
                ));
                let old = self.lock().insert(
                    app.to_string(),
                    Served {
                        listen,
                        proxy: proxy.clone(),
                        stop,
                    },
                );
                if let Some(old) = old {
                    old.stop.cancel();
                }
                proxy
            }
        }
    }

    /// Every serving app's address and the live upstream's counters.
    pub fn traffic(&self) -> HashMap<String, Traffic> {
        self.lock()
            .iter()
            .filter_map(|(app, s)| {
                let upstream = s.proxy.upstream()?;
                Some((
                    app.clone(),
                    Traffic {
                        listen: s.listen,
                        release: upstream.release.clone(),
                        stats: upstream.stats.snapshot(),
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_are_reserved_once_and_conflicts_are_named() {
        let apps = Apps::default();
        let shutdown = CancellationToken::new();
        let Reserved::Bound(addr, listener) = apps
            .reserve("api", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
        else {
            panic!("a new app binds");
        };
        let listen = listener.local_addr().unwrap();
        assert_eq!(addr.ip(), listen.ip());
        apps.install("api", Reserved::Bound(listen, listener), &shutdown);
        assert!(matches!(
            apps.reserve("api", listen).await.unwrap(),
            Reserved::Serving(_)
        ));
        let err = apps.reserve("web", listen).await.unwrap_err().to_string();
        assert!(err.contains("public address of app api"), "{err}");
        // A port another program holds.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = apps
            .reserve("web", taken.local_addr().unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot listen on"), "{err}");
        shutdown.cancel();
    }

    #[test]
    fn a_wildcard_listen_address_takes_the_configured_ip() {
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            public_addr(addr("0.0.0.0:8080"), Some(ip)),
            addr("127.0.0.2:8080")
        );
        assert_eq!(
            public_addr(addr("[::]:8080"), Some(ip)),
            addr("127.0.0.2:8080")
        );
        // A spec that names its IP keeps it (a loopback-only app stays loopback-only).
        assert_eq!(
            public_addr(addr("127.0.0.1:8080"), Some(ip)),
            addr("127.0.0.1:8080")
        );
        assert_eq!(
            public_addr(addr("0.0.0.0:8080"), None),
            addr("0.0.0.0:8080")
        );
    }

    #[tokio::test]
    async fn two_agents_serve_one_wildcard_port_on_their_own_ips() {
        let shutdown = CancellationToken::new();
        let a = Apps::default().with_listen_ip(Some("127.0.0.2".parse().unwrap()));
        let b = Apps::default().with_listen_ip(Some("127.0.0.3".parse().unwrap()));
        // A free port on both addresses.
        let port = std::net::TcpListener::bind("127.0.0.2:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
        for apps in [&a, &b] {
            let reserved = apps.reserve("api", spec).await.unwrap();
            let Reserved::Bound(bound, _) = &reserved else {
                panic!("a new app binds");
            };
            assert_eq!(bound.port(), port);
            assert!(!bound.ip().is_unspecified(), "{bound}");
            apps.install("api", reserved, &shutdown);
        }
        assert_eq!(a.traffic().len(), 0, "no upstream yet");
        assert!(matches!(
            a.reserve("api", spec).await.unwrap(),
            Reserved::Serving(_)
        ));
        shutdown.cancel();
    }
}
