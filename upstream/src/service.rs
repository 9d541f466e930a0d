//! The demo's [`Handler`]: runs its commands, and pushes through the data-plane
//! stream that carried the request's node (or, with no stream open because
//! the gateways use the unary contract, through `GatewayService`).

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use gatesvr_proto::upstream::gateway_service_client::GatewayServiceClient;
use gatesvr_proto::upstream::{
    BroadcastRequest, BroadcastResponse, ProcessRequestRequest, ProcessRequestResponse,
    PushToClientRequest, TargetType,
};
use gatesvr_upstream_sdk::{Handler, Pusher, Reply};
use parking_lot::Mutex;
use serde_json::json;
use tonic::Request;
use tonic::transport::Channel;

use crate::commands::{Command, app_code};
use crate::rooms::Rooms;

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
    /// The data-plane streams (streaming contract), preferred for pushes.
    pusher: Pusher,
    push_timeout: Duration,
    rooms: Mutex<Rooms>,
}

impl DemoUpstream {
    /// A handler for `zone` pushing through `pusher`'s streams, or through
    /// `gateway` when none is open.
    pub fn new(
        zone: String,
        service_name: String,
        gateway: Channel,
        pusher: Pusher,
        push_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                zone,
                service_name,
                gateway: GatewayServiceClient::new(gateway)
                    .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES),
                pusher,
                push_timeout,
                rooms: Mutex::new(Rooms::default()),
            }),
        }
    }

    /// Queues one push: on a data-plane stream if one is open, else with
    /// `GatewayService.PushToClient`. Whether it was queued.
    async fn push(&self, push: PushToClientRequest) -> bool {
        let target = push.target_id.clone();
        let timeout = self.inner.push_timeout;
        let result = if self.inner.pusher.streams() > 0 {
            tokio::time::timeout(timeout, self.inner.pusher.push(push))
                .await
                .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        } else {
            let mut gateway = self.inner.gateway.clone();
            let mut request = Request::new(push);
            request.set_timeout(timeout);
            tokio::time::timeout(timeout, gateway.push_to_client(request))
                .await
                .map(|r| r.map(|_| ()).map_err(|s| s.to_string()))
        };
        match result {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::warn!(%target, %error, "push refused by the gateway");
                false
            }
            Err(_) => {
                tracing::warn!(%target, "push timed out");
                false
            }
        }
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
                data: data.clone().into_bytes().into(),
                durable: false,
            };
            self.push(push)
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
        let broadcast = BroadcastRequest {
            msg_type: "broadcast".into(),
            content: text.to_owned(),
            data: Vec::new(),
            zones: vec![self.inner.zone.clone()],
        };
        let timeout = self.inner.push_timeout;
        let result: Result<Result<BroadcastResponse, String>, _> =
            if self.inner.pusher.streams() > 0 {
                tokio::time::timeout(timeout, self.inner.pusher.broadcast(broadcast))
                    .await
                    .map(|r| r.map_err(|e| e.to_string()))
            } else {
                let mut request = Request::new(broadcast);
                request.set_timeout(timeout);
                let mut gateway = self.inner.gateway.clone();
                tokio::time::timeout(timeout, gateway.broadcast_to_clients(request))
                    .await
                    .map(|r| r.map(|r| r.into_inner()).map_err(|s| s.to_string()))
            };
        match result {
            Ok(Ok(r)) => ok(json!({ "queued": r.queued, "rejected": r.rejected })),
            Ok(Err(error)) => failure(app_code::PUSH_FAILED, format!("broadcast failed: {error}")),
            Err(_) => failure(app_code::PUSH_FAILED, "broadcast timed out".into()),
        }
    }
}

impl Handler for DemoUpstream {
    async fn handle(&self, req: ProcessRequestRequest) -> Reply {
        if req.zone != self.inner.zone {
            // Served anyway; a mismatch points at gateway routing config.
            tracing::warn!(zone = %req.zone, ours = %self.inner.zone, "request for another zone");
        }
        let response = self.execute(&req).await;
        tracing::debug!(trace_id = %req.trace_id, openid = %req.openid, seq_id = req.seq_id,
            app_code = response.app_code, "request served");
        Reply::Done(response)
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
