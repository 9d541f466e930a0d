//! `UpstreamService`: runs the demo's commands and pushes through the gateway.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::join_all;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_proto::upstream::upstream_service_server::UpstreamService;
use gatesvr_proto::upstream::{
    BroadcastRequest, GetStatusRequest, ProcessRequestRequest, ProcessRequestResponse,
    PushToClientRequest, TargetType, UpstreamStatus,
};
use parking_lot::Mutex;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::commands::{Command, app_code};
use crate::rooms::Rooms;

/// Metadata key the gateway puts the request's trace id in.
const TRACE_ID_METADATA: &str = "x-gatesvr-trace-id";

/// The demo upstream's request handler. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DemoUpstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    zone: String,
    service_name: String,
    /// Lazily connected: the gateway may start after us, and a broken
    /// connection is re-established on the next push.
    gateway: GatewayServiceClient<Channel>,
    push_timeout: Duration,
    rooms: Mutex<Rooms>,
    /// What GetStatus reports as `healthy`; follows the health service.
    serving: AtomicBool,
    requests_total: AtomicU64,
    inflight: AtomicU32,
}

impl DemoUpstream {
    /// A handler for `zone` pushing through `gateway`.
    pub fn new(
        zone: String,
        service_name: String,
        gateway: Channel,
        push_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                zone,
                service_name,
                gateway: GatewayServiceClient::new(gateway)
                    .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES),
                push_timeout,
                rooms: Mutex::new(Rooms::default()),
                serving: AtomicBool::new(false),
                requests_total: AtomicU64::new(0),
                inflight: AtomicU32::new(0),
            }),
        }
    }

    /// Sets what GetStatus reports as `healthy`.
    pub fn set_serving(&self, serving: bool) {
        self.inner.serving.store(serving, Ordering::Relaxed);
    }

    /// Runs one command for `req`'s caller.
    async fn execute(&self, req: &ProcessRequestRequest) -> ProcessRequestResponse {
        let command = match Command::parse(&req.payload) {
            Ok(command) => command,
            Err(err) => return failure(err.app_code(), err.to_string()),
        };
        match command {
            Command::Echo(text) => ok(json!({
                "zone": self.inner.zone,
                "openid": req.openid,
                "seq_id": req.seq_id,
                "echo": text,
            })),
            Command::Whoami => ok(json!({
                "zone": self.inner.zone,
                "openid": req.openid,
                "session_id": req.session_id,
                "node_id": req.node_id,
                "service": self.inner.service_name,
            })),
            Command::Join(room) => {
                let members = self.inner.rooms.lock().join(room, &req.openid);
                ok(json!({ "room": room, "members": members }))
            }
            Command::Leave(room) => {
                let members = self.inner.rooms.lock().leave(room, &req.openid);
                ok(json!({ "room": room, "members": members }))
            }
            Command::Say { room, text } => self.say(req, room, text).await,
            Command::Broadcast(text) => self.broadcast(text).await,
        }
    }

    /// Pushes a `chat` message to every member of `room` (the sender too, so
    /// every member sees the same sequence).
    async fn say(
        &self,
        req: &ProcessRequestRequest,
        room: &str,
        text: &str,
    ) -> ProcessRequestResponse {
        let members = self.inner.rooms.lock().members_if_member(room, &req.openid);
        let Some(members) = members else {
            return failure(app_code::NOT_A_MEMBER, format!("join {room} first"));
        };
        let data = json!({ "room": room, "from": req.openid, "text": text }).to_string();
        let pushes = members.into_iter().map(|openid| {
            let push = PushToClientRequest {
                target_type: TargetType::Openid.into(),
                target_id: openid,
                msg_type: "chat".into(),
                content: text.to_owned(),
                data: data.clone().into_bytes(),
                durable: false,
            };
            let mut gateway = self.inner.gateway.clone();
            let mut request = Request::new(push);
            request.set_timeout(self.inner.push_timeout);
            async move {
                let target = request.get_ref().target_id.clone();
                match tokio::time::timeout(self.inner.push_timeout, gateway.push_to_client(request))
                    .await
                {
                    Ok(Ok(_)) => true,
                    Ok(Err(status)) => {
                        tracing::warn!(%target, %status, "push refused by the gateway");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(%target, "push timed out");
                        false
                    }
                }
            }
        });
        let results = join_all(pushes).await;
        let pushed = results.iter().filter(|ok| **ok).count();
        let failed = results.len() - pushed;
        let body = json!({ "room": room, "pushed": pushed, "failed": failed });
        if failed == 0 {
            ok(body)
        } else {
            ProcessRequestResponse {
                app_code: app_code::PUSH_FAILED,
                payload: body.to_string().into_bytes(),
                message: format!("{failed} of {} pushes failed", results.len()),
            }
        }
    }

    /// Pushes `text` to every session of this instance's zone.
    async fn broadcast(&self, text: &str) -> ProcessRequestResponse {
        let mut request = Request::new(BroadcastRequest {
            msg_type: "broadcast".into(),
            content: text.to_owned(),
            data: Vec::new(),
            zones: vec![self.inner.zone.clone()],
        });
        request.set_timeout(self.inner.push_timeout);
        let mut gateway = self.inner.gateway.clone();
        match tokio::time::timeout(
            self.inner.push_timeout,
            gateway.broadcast_to_clients(request),
        )
        .await
        {
            Ok(Ok(response)) => {
                let r = response.into_inner();
                ok(json!({ "queued": r.queued, "rejected": r.rejected }))
            }
            Ok(Err(status)) => {
                failure(app_code::PUSH_FAILED, format!("broadcast failed: {status}"))
            }
            Err(_) => failure(app_code::PUSH_FAILED, "broadcast timed out".into()),
        }
    }
}

#[tonic::async_trait]
impl UpstreamService for DemoUpstream {
    async fn process_request(
        &self,
        request: Request<ProcessRequestRequest>,
    ) -> Result<Response<ProcessRequestResponse>, Status> {
        let trace_id = request
            .metadata()
            .get(TRACE_ID_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let req = request.into_inner();
        if req.zone != self.inner.zone {
            // Served anyway; a mismatch points at gateway routing config.
            tracing::warn!(zone = %req.zone, ours = %self.inner.zone, "request for another zone");
        }
        self.inner.requests_total.fetch_add(1, Ordering::Relaxed);
        let response = {
            // Decremented on drop, also when the caller cancels mid-request.
            let _inflight = InFlight::enter(&self.inner.inflight);
            self.execute(&req).await
        };
        tracing::debug!(%trace_id, openid = %req.openid, seq_id = req.seq_id, app_code = response.app_code,
            "request served");
        Ok(Response::new(response))
    }

    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<UpstreamStatus>, Status> {
        Ok(Response::new(UpstreamStatus {
            service_name: self.inner.service_name.clone(),
            zone: self.inner.zone.clone(),
            healthy: self.inner.serving.load(Ordering::Relaxed),
            requests_total: self.inner.requests_total.load(Ordering::Relaxed),
            inflight: self.inner.inflight.load(Ordering::Relaxed),
        }))
    }
}

/// Counts one request in `inflight` while alive.
struct InFlight<'a>(&'a AtomicU32);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn ok(body: serde_json::Value) -> ProcessRequestResponse {
    ProcessRequestResponse {
        app_code: app_code::OK,
        payload: body.to_string().into_bytes(),
        message: String::new(),
    }
}

fn failure(app_code: i32, message: String) -> ProcessRequestResponse {
    ProcessRequestResponse {
        app_code,
        payload: Vec::new(),
        message,
    }
}
