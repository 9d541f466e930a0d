//! gatectl's HTTP(S) client of the admin API: a list of endpoints tried in turn (like
//! etcdctl) when one cannot be reached, TLS with a CA file and an optional client
//! certificate, one HTTP/1 connection per request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::out::{Failure, fail};
use gatesvr_controlplane::admin::model::ApiError;

/// Exit code when no endpoint could be reached.
pub const EXIT_UNREACHABLE: u8 = 7;

/// TLS options (`--cacert`, `--cert`, `--key`).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Endpoint {
    https: bool,
    host: String,
    port: u16,
    /// As given, for messages.
    text: String,
}

fn parse_endpoint(text: &str) -> Result<Endpoint, Failure> {
    let uri: http::Uri = text
        .parse()
        .map_err(|e| fail(2, format!("--endpoints {text}: {e}")))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(fail(
                2,
                format!("--endpoints {text}: use http://host:port or https://host:port"),
            ));
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| fail(2, format!("--endpoints {text}: no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(Endpoint {
        https,
        host,
        port,
        text: text.trim_end_matches('/').to_string(),
    })
}

fn tls_config(o: &TlsOptions) -> Result<rustls::ClientConfig, Failure> {
    use gatesvr_common::tls::{load_certs, load_key, provider, root_store};
    let Some(ca) = &o.cacert else {
        return Err(fail(
            2,
            "https endpoints need --cacert FILE (the CA that signed the admin API's certificate)",
        ));
    };
    let roots = root_store(ca).map_err(|e| fail(2, format!("--cacert: {e}")))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(2, format!("tls: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&o.cert, &o.key) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(
                load_certs(c).map_err(|e| fail(2, format!("--cert: {e}")))?,
                load_key(k).map_err(|e| fail(2, format!("--key: {e}")))?,
            )
            .map_err(|e| fail(2, format!("--cert/--key: {e}")))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(fail(2, "--cert and --key go together")),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The admin API behind a list of endpoints.
pub struct Api {
    endpoints: Vec<Endpoint>,
    token: Option<String>,
    tls: Option<tokio_rustls::TlsConnector>,
    pub consistency: Option<&'static str>,
    timeout: Duration,
}

/// Why one attempt failed.
enum Attempt {
    /// Could not connect or talk to this endpoint: try the next one.
    Unreachable(String),
    /// The server answered.
    Answered(http::StatusCode, Bytes),
}

impl Api {
    pub fn new(
        endpoints: &[String],
        token: Option<String>,
        tls: &TlsOptions,
        consistency: Option<&'static str>,
    ) -> Result<Api, Failure> {
        let endpoints = endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(parse_endpoint)
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(fail(2, "no --endpoints given"));
        }
        let tls = if endpoints.iter().any(|e| e.https) {
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config(tls)?)))
        } else {
            None
        };
        Ok(Api {
            endpoints,
            token,
            tls,
            consistency,
            // Backups of large clusters take a while to serve and to commit.
            timeout: Duration::from_secs(120),
        })
    }

    /// `?k=v&...` with the read consistency appended; values are percent-encoded.
    pub fn query(&self, extra: &[(&str, &str)]) -> String {
        let mut q: Vec<String> = extra
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        if let Some(c) = self.consistency {
            q.push(format!("consistency={c}"));
        }
        if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        }
    }

    async fn attempt(
        &self,
        ep: &Endpoint,
        method: &str,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Attempt {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{}:{}", ep.host, ep.port))
            .header("content-type", content_type);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match req.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return Attempt::Unreachable(format!("bad request: {e}")),
        };
        let fut = async {
            let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            let resp = match (&self.tls, ep.https) {
                (Some(tls), true) => {
                    let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                        .map_err(|e| format!("server name {}: {e}", ep.host))?;
                    let stream = tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS: {e}"))?;
                    send(TokioIo::new(stream), req).await?
                }
                _ => send(TokioIo::new(tcp), req).await?,
            };
            Ok::<_, String>(resp)
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Attempt::Unreachable(format!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) => Attempt::Unreachable(e),
            Ok(Ok((status, bytes))) => Attempt::Answered(status, bytes),
        }
    }

    /// Sends a request to the first endpoint that answers; returns the body of a 2xx answer,
    /// or a `Failure` with the exit code the API's error maps to.
    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<Bytes, Failure> {
        let mut errors = Vec::new();
        for ep in &self.endpoints {
            match self
                .attempt(ep, method, path, content_type, body.clone())
                .await
            {
                Attempt::Unreachable(e) => errors.push(format!("{}: {e}", ep.text)),
                Attempt::Answered(status, bytes) if status.is_success() => return Ok(bytes),
                Attempt::Answered(status, bytes) => return Err(api_failure(status, &bytes)),
            }
        }
        Err(fail(
            EXIT_UNREACHABLE,
            format!("cannot reach the admin API: {}", errors.join("; ")),
        ))
    }

    /// A JSON request; the JSON of a 2xx answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let bytes = self
            .call_raw(method, path, "application/json", Bytes::from(body))
            .await?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// A GET decoded both as JSON and as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<(Value, T), Failure> {
        let v = self.call("GET", path, None).await?;
        let t = serde_json::from_value(v.clone())
            .map_err(|e| fail(1, format!("unexpected answer from {path}: {e}")))?;
        Ok((v, t))
    }
}

async fn send<I>(
    io: I,
    req: http::Request<Full<Bytes>>,
) -> Result<(http::StatusCode, Bytes), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok((status, bytes))
}

/// The exit code and message of an error answer.
fn api_failure(status: http::StatusCode, bytes: &[u8]) -> Failure {
    let err: Option<ApiError> = serde_json::from_slice(bytes).ok();
    let (code_str, message, leader) = match err {
        Some(e) => (e.error, e.message, e.leader),
        None => (String::new(), format!("HTTP {status}"), None),
    };
    let code = match status.as_u16() {
        401 | 403 => 6,
        404 => 3,
        400 | 409 | 413 | 415 | 422 => 4,
        421 | 503 => 5,
        _ => 1,
    };
    let mut message = format!("{message} ({code_str}, HTTP {})", status.as_u16());
    if let Some(l) = leader {
        message.push_str(&format!(
            "\nleader: node {} at {} (add it to --endpoints)",
            l.id, l.admin_addr
        ));
    }
    fail(code, message)
}

/// Percent-encodes a query value or path segment (RFC 3986 unreserved characters pass).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
