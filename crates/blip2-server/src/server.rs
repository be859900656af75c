//! Binding, serving and stopping: [`Server`], its configuration and its handle.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;

use blip2_pipeline::Blip2;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{AppState, ModelInfo};
use crate::error::Error;
use crate::limits::Limits;
use crate::queue::{Gate, JobQueue, QueueStatus, WorkerPause};
use crate::sessions::SessionStore;
use crate::worker::Worker;

/// The port the server listens on by default (the one Gradio demos use).
pub const DEFAULT_PORT: u16 = 7860;

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The address [`Server::bind`] listens on; port 0 picks a free port. Default
    /// `127.0.0.1:7860`.
    pub addr: SocketAddr,
    /// The request limits.
    pub limits: Limits,
    /// The model's name as shown by `/api/health` and the page (a hub id or directory).
    pub model_name: String,
    /// Whether uploaded photos are turned upright by their EXIF orientation tag.
    pub apply_exif_orientation: bool,
}

impl ServerConfig {
    /// The defaults, for the model called `model_name`.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT)),
            limits: Limits::default(),
            model_name: model_name.into(),
            apply_exif_orientation: true,
        }
    }
}

/// A bound server with its model worker running; [`Server::run`] serves requests.
pub struct Server {
    listener: TcpListener,
    router: axum::Router,
    handle: ServerHandle,
    worker: JoinHandle<()>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Controls of a running server that HTTP does not reach.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    queue: Arc<JobQueue>,
    gate: Arc<Gate>,
}

impl ServerHandle {
    /// Holds the worker before its next job until the returned guard is dropped.
    pub fn pause_worker(&self) -> WorkerPause {
        self.gate.pause()
    }

    /// The queue's status now.
    pub fn queue_status(&self) -> QueueStatus {
        self.queue.status()
    }

    /// A receiver notified of every change of the queue's status, to wait for one.
    pub fn watch_queue(&self) -> watch::Receiver<QueueStatus> {
        self.queue.subscribe()
    }
}

impl Server {
    /// Checks the configuration, binds `config.addr` and starts the model worker.
    ///
    /// Binding an address that is not loopback logs a warning: the server has no
    /// authentication, so anyone who can reach the address can use the model.
    pub async fn bind(blip2: Arc<Blip2>, config: ServerConfig) -> Result<Self, Error> {
        let listener = std::net::TcpListener::bind(config.addr).map_err(|source| Error::Bind {
            addr: config.addr,
            source,
        })?;
        Self::from_listener(blip2, listener, config)
    }

    /// Like [`Server::bind`] with a listener bound already (`config.addr` is not used),
    /// so that a program can find the port taken before it spends time loading a model.
    /// Call it inside a tokio runtime.
    pub fn from_listener(
        blip2: Arc<Blip2>,
        listener: std::net::TcpListener,
        config: ServerConfig,
    ) -> Result<Self, Error> {
        config.limits.validate().map_err(Error::InvalidConfig)?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            tracing::warn!(
                address = %addr,
                "listening on an address that is not loopback; the server has no authentication, \
                 so anyone who can reach this address can use the model"
            );
        }

        let (queue, receiver) = JobQueue::new(config.limits.queue_size);
        let gate = Arc::new(Gate::default());
        let session_count = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            blip2: Arc::clone(&blip2),
            queue: Arc::clone(&queue),
            gate: Arc::clone(&gate),
            sessions: SessionStore::new(config.limits.max_sessions, Arc::clone(&session_count)),
            image_options: blip2_image::LoadOptions {
                apply_exif_orientation: config.apply_exif_orientation,
                max_pixels: config.limits.max_image_pixels,
            },
            request_timeout: config.limits.request_timeout,
        }
        .spawn(receiver)?;

        let model = ModelInfo::of(&blip2, &config.model_name);
        let state = AppState::new(
            blip2,
            Arc::clone(&queue),
            config.limits,
            model,
            session_count,
        );
        Ok(Self {
            listener,
            router: crate::api::router(state),
            handle: ServerHandle { queue, gate },
            worker,
        })
    }

    /// The address the server listens on (with the port picked when the config set 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    }

    /// Controls that stay usable while [`Server::run`] runs.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until `shutdown` completes, then stops taking connections, lets the
    /// requests in flight finish (queued jobs included), and stops the model worker.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let addr = self.local_addr();
        tracing::info!(address = %addr, "listening on http://{addr}/");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down: finishing the requests in flight");
            })
            .await?;

        self.handle.queue.close();
        let worker = self.worker;
        let joined = tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(std::io::Error::other)?;
        if joined.is_err() {
            tracing::error!("the model worker thread panicked");
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("received Ctrl-C"),
            Err(error) => {
                tracing::error!(%error, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
                tracing::info!("received SIGTERM");
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
