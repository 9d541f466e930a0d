//! Pushes and broadcasts that upstreams send on their streams take the same
//! path as `GatewayService` calls: [`GatewaySink`] hands them to the node's
//! [`Gateway`](crate::gateway::Gateway) (routing to the owner node,
//! durability, queue bounds and size checks included).

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use gatesvr_proto::upstream::gateway_service_server::GatewayService;
use gatesvr_proto::upstream::{BroadcastRequest, PushResult, StreamBroadcastResult};

use super::stream::PushSink;
use crate::gateway::Gateway;
use crate::gateway::wire::InPush;
use crate::node::Node;

/// The node's gateway as a [`PushSink`].
pub(crate) struct GatewaySink(pub Arc<Node>);

impl std::fmt::Debug for GatewaySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewaySink")
    }
}

impl PushSink for GatewaySink {
    fn push(&self, push: InPush) -> BoxFuture<'static, PushResult> {
        let gateway = Gateway {
            node: self.0.clone(),
        };
        async move {
            let push = tonic::Request::new(push.into());
            crate::gateway::push_result(gateway.push_to_client(push).await)
        }
        .boxed()
    }

    fn push_batch(
        &self,
        pushes: Vec<InPush>,
        codes_only: bool,
    ) -> BoxFuture<'static, crate::gateway::BatchAnswer> {
        let gateway = Gateway {
            node: self.0.clone(),
        };
        async move { gateway.push_many(0, pushes, codes_only).await }.boxed()
    }

    fn broadcast(&self, broadcast: BroadcastRequest) -> BoxFuture<'static, StreamBroadcastResult> {
        let gateway = Gateway {
            node: self.0.clone(),
        };
        async move {
            match gateway
                .broadcast_to_clients(tonic::Request::new(broadcast))
                .await
            {
                Ok(r) => StreamBroadcastResult {
                    response: Some(r.into_inner()),
                    ..Default::default()
                },
                Err(status) => StreamBroadcastResult {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    ..Default::default()
                },
            }
        }
        .boxed()
    }
}
