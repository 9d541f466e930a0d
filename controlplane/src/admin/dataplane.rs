//! The control plane as a client of data-plane nodes' HTTP port (`/stats`), for the node
//! stats endpoint and the console: plain HTTP/1, one request, bounded in time.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};

use crate::error::Error;

/// How long a data-plane node has to answer.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer read.
const MAX_BYTES: usize = 4 << 20;

/// GETs `url` and parses its JSON.
pub(crate) async fn get_json(url: &str) -> Result<serde_json::Value, Error> {
    let unreachable =
        |e: &dyn std::fmt::Display| Error::DataPlaneUnreachable(format!("{url}: {e}"));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let uri: http::Uri = url.parse().map_err(|e| unreachable(&e))?;
    let fut = async {
        let resp = client.get(uri).await.map_err(|e| unreachable(&e))?;
        if !resp.status().is_success() {
            return Err(unreachable(&format!("HTTP {}", resp.status())));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BYTES)
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| unreachable(&e))
    };
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .map_err(|_| unreachable(&format!("no answer within {TIMEOUT:?}")))?
}
