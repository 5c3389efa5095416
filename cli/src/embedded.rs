//! The embedded farm of `kiln render`: a coordinator with the memory store
//! and N workers in this process, talking real gRPC over loopback, so a solo
//! user runs the same code paths as the distributed farm.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_coordinator::results::ResultStore;
use kiln_coordinator::store::{MemoryStore, Store};
use kiln_coordinator::{CoordinatorConfig, Core, server};
use kiln_proto::ids::WorkerId;
use kiln_worker::agent::{Agent, AgentConfig, LeaseObserver, Shutdown};
use kiln_worker::link::Link;
use kiln_worker::render::Renderer;
use tokio::task::JoinHandle;

use crate::client::Farm;

/// A running embedded farm.
pub struct EmbeddedFarm {
    /// A client for its coordinator.
    pub farm: Farm,
    /// The coordinator's URL.
    url: String,
    core: Arc<Core>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    workers: Vec<JoinHandle<Result<kiln_worker::agent::Summary, kiln_worker::agent::AgentError>>>,
    shutdown: Shutdown,
    /// Tasks each worker added from now on renders at once.
    pub slots: u32,
    /// Tasks each worker added from now on holds beyond its slots
    /// (`AgentConfig::prefetch`).
    pub prefetch: u32,
}

impl EmbeddedFarm {
    /// Starts a coordinator with the memory store on a free loopback port
    /// and `workers` agents sharing `renderer`; returns once every worker has registered.
    pub async fn start(renderer: Arc<dyn Renderer>, workers: u32) -> anyhow::Result<Self> {
        Self::start_with(Arc::new(MemoryStore::new()), renderer, workers).await
    }

    /// Like [`EmbeddedFarm::start`], over the given store.
    pub async fn start_with(
        store: Arc<dyn Store>,
        renderer: Arc<dyn Renderer>,
        workers: u32,
    ) -> anyhow::Result<Self> {
        let renderers = (0..workers).map(|_| renderer.clone()).collect();
        Self::start_workers(store, renderers, None).await
    }

    /// Starts a coordinator over `store` and one worker per renderer, each
    /// reporting its lease timings to `observer`.
    pub async fn start_workers(
        store: Arc<dyn Store>,
        renderers: Vec<Arc<dyn Renderer>>,
        observer: Option<LeaseObserver>,
    ) -> anyhow::Result<Self> {
        let mut farm = Self::start_coordinator(store).await?;
        farm.add_workers(renderers, observer).await?;
        Ok(farm)
    }

    /// Starts the coordinator alone, on a free loopback port.
    pub async fn start_coordinator(store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot open a loopback port for the embedded coordinator")?;
        let url = format!("http://{}", listener.local_addr()?);
        let core = Arc::new(Core::new(
            store,
            ResultStore::in_memory(),
            CoordinatorConfig::default(),
        ));
        let server = tokio::spawn(server::serve(
            listener,
            core.clone(),
            None,
            server::SideDoor::Off,
        ));
        Ok(Self {
            farm: Farm::new(
                &url,
                &kiln_proto::connect::TlsOptions::default(),
                kiln_proto::connect::Bearer::none(),
            )?,
            url,
            core,
            server,
            workers: Vec::new(),
            shutdown: Shutdown::default(),
            slots: 1,
            prefetch: kiln_worker::agent::DEFAULT_PREFETCH,
        })
    }

    /// Starts one worker per renderer and returns once all have registered.
    pub async fn add_workers(
        &mut self,
        renderers: Vec<Arc<dyn Renderer>>,
        observer: Option<LeaseObserver>,
    ) -> anyhow::Result<()> {
        let first = self.workers.len();
        let total = first + renderers.len();
        for (i, renderer) in renderers.into_iter().enumerate() {
            let agent = Agent::new(
                Link::new(
                    &self.url,
                    &kiln_proto::connect::TlsOptions::default(),
                    kiln_proto::connect::Bearer::none(),
                )?,
                renderer,
                AgentConfig {
                    worker_id: WorkerId(format!("local-{}", first + i)),
                    slots: self.slots,
                    prefetch: self.prefetch,
                    labels: Default::default(),
                    lease_observer: observer.clone(),
                    readiness: Default::default(),
                    // Nobody watches an embedded farm's previews.
                    preview_every: 0,
                },
            )?;
            self.workers
                .push(tokio::spawn(agent.run(self.shutdown.clone())));
        }
        let started = tokio::time::Instant::now();
        loop {
            let registered = self.farm.workers().await.map(|w| w.len()).unwrap_or(0);
            if registered >= total {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("only {registered} of {total} embedded workers registered within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drains the workers and stops the coordinator.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.drain.cancel();
        for w in self.workers {
            w.await.context("an embedded worker panicked")??;
        }
        self.core.shutdown.cancel();
        self.server
            .await
            .context("the embedded coordinator panicked")??;
        Ok(())
    }
}
