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
use kiln_worker::agent::{Agent, AgentConfig, Shutdown};
use kiln_worker::link::Link;
use kiln_worker::render::Renderer;
use tokio::task::JoinHandle;

use crate::client::Farm;

/// A running embedded farm.
pub struct EmbeddedFarm {
    /// A client for its coordinator.
    pub farm: Farm,
    core: Arc<Core>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    workers: Vec<JoinHandle<Result<kiln_worker::agent::Summary, kiln_worker::agent::AgentError>>>,
    shutdown: Shutdown,
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot open a loopback port for the embedded coordinator")?;
        let url = format!("http://{}", listener.local_addr()?);
        let core = Arc::new(Core::new(
            store,
            ResultStore::in_memory(),
            CoordinatorConfig::default(),
        ));
        let server = tokio::spawn(server::serve(listener, core.clone()));
        let shutdown = Shutdown::default();
        let mut handles = Vec::new();
        for i in 0..workers {
            let agent = Agent::new(
                Link::new(&url)?,
                renderer.clone(),
                AgentConfig {
                    worker_id: WorkerId(format!("local-{i}")),
                    slots: 1,
                    labels: Default::default(),
                },
            )?;
            handles.push(tokio::spawn(agent.run(shutdown.clone())));
        }
        let farm = Farm::new(&url)?;
        let started = tokio::time::Instant::now();
        loop {
            let registered = farm.workers().await.map(|w| w.len()).unwrap_or(0);
            if registered >= workers as usize {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("only {registered} of {workers} embedded workers registered within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            farm,
            core,
            server,
            workers: handles,
            shutdown,
        })
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
