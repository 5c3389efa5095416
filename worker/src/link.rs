//! The worker's side of `kiln.v1.WorkerLink`: one client, a deadline on every call.

use std::time::Duration;

use kiln_proto::connect::{
    AuthChannel, Bearer, TlsOptions, channel, with_deadline, worker_link_client,
};
use kiln_proto::error::FieldError;
use kiln_proto::lora_set::ReadyLoraSet;
use kiln_proto::pb::{self, worker_link_client::WorkerLinkClient};
use tonic::Status;

/// Deadline of every call except the Lease long poll.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a Complete, which uploads a whole PNG.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed on top of the long poll's wait for the answer to arrive.
const POLL_SLACK: Duration = Duration::from_secs(5);

/// A connection to a coordinator's WorkerLink service.
#[derive(Clone)]
pub struct Link {
    client: WorkerLinkClient<AuthChannel>,
}

/// Runs a call with a client-side deadline too, so a dead peer cannot hang it.
async fn bounded<T>(
    deadline: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {deadline:?}"
        ))),
    }
}

impl Link {
    /// Returns a link to the coordinator at `url`; it connects on first use,
    /// over TLS configured from `tls` for an `https://` URL, sending `token`
    /// with every call.
    ///
    /// # Errors
    /// When the URL is invalid, or the TLS material of an `https://` URL is.
    pub fn new(url: &str, tls: &TlsOptions, token: Bearer) -> Result<Self, FieldError> {
        Ok(Self {
            client: worker_link_client(channel("--coordinator", url, tls)?, token),
        })
    }

    /// Opens the worker's session.
    pub async fn register(&self, req: pb::RegisterRequest) -> Result<pb::RegisterResponse, Status> {
        let mut c = self.client.clone();
        bounded(CALL_TIMEOUT, c.register(with_deadline(req, CALL_TIMEOUT))).await
    }

    /// Long-polls for up to `max_tasks` leases, waiting at most `wait`;
    /// `resident_models` and `ready_lora_sets` tell the scheduler what is
    /// loaded and which LoRA sets are merged.
    pub async fn lease(
        &self,
        worker_id: &str,
        max_tasks: u32,
        wait: Duration,
        resident_models: Vec<String>,
        ready_lora_sets: &[ReadyLoraSet],
    ) -> Result<pb::LeaseResponse, Status> {
        let req = pb::LeaseRequest {
            worker_id: worker_id.to_string(),
            max_tasks,
            wait_ms: wait.as_millis() as u32,
            resident_models,
            ready_lora_sets: kiln_proto::convert::ready_sets_to_pb(ready_lora_sets),
        };
        let deadline = wait + POLL_SLACK;
        let mut c = self.client.clone();
        bounded(deadline, c.lease(with_deadline(req, deadline))).await
    }

    /// Reports progress and extends the leases in hand.
    pub async fn heartbeat(
        &self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, Status> {
        let mut c = self.client.clone();
        bounded(CALL_TIMEOUT, c.heartbeat(with_deadline(req, CALL_TIMEOUT))).await
    }

    /// Uploads a finished image under its lease epoch; the answer carries the
    /// next leases when the request asked for them (`lease_next`).
    pub async fn complete(&self, req: pb::CompleteRequest) -> Result<pb::CompleteResponse, Status> {
        let mut c = self.client.clone();
        bounded(
            UPLOAD_TIMEOUT,
            c.complete(with_deadline(req, UPLOAD_TIMEOUT)),
        )
        .await
    }

    /// Reports a classified fault under the lease epoch.
    pub async fn fail(&self, req: pb::FailRequest) -> Result<pb::FailResponse, Status> {
        let mut c = self.client.clone();
        bounded(CALL_TIMEOUT, c.fail(with_deadline(req, CALL_TIMEOUT))).await
    }
}
