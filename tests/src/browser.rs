//! A real headless Chromium driven over WebDriver (chromedriver + fantoccini)
//! for the browser tests. Chromium and chromedriver come from Debian
//! (`scripts/test` installs them); the test spawns chromedriver on a free
//! 127.0.0.1 port and ends it when the [`Browser`] drops.
//!
//! Pages are served by the data plane's WebSocket listener (`web_root` =
//! `sdk-js/`); `sdk-js/test/harness.js` exposes `window.harness`, which
//! [`Browser::call`] invokes and whose JSON answer it returns.

use crate::procs::free_port;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::PATIENCE;

/// The JavaScript SDK's directory, served as the data plane's web root.
pub fn sdk_js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdk-js")
}

pub struct Browser {
    pub client: fantoccini::Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver; scripts/test installs it)");
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium_binary(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    // The page and the WebSocket are served with the test's
                    // private CA. WebTransport still checks the pinned
                    // serverCertificateHashes (a wrong hash fails: tested).
                    "--ignore-certificate-errors",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            "acceptInsecureCerts": true,
        });
        let caps = match caps {
            Value::Object(map) => map,
            _ => unreachable!("a JSON object literal"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "chromedriver did not start a session: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Self {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Opens the harness page served by the node's WebSocket listener.
    pub async fn open_harness(&self, websocket: SocketAddr) {
        let url = format!("https://127.0.0.1:{}/test/index.html", websocket.port());
        self.client.goto(&url).await.expect("harness page loads");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let ready = self
                .client
                .execute("return window.harnessReady === true", vec![])
                .await
                .expect("script runs");
            if ready == Value::Bool(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the harness page did not load its module"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `await window.harness[function](...args)`.
    pub async fn call(&self, function: &str, args: Vec<Value>) -> Value {
        let script = format!("return await window.harness.{function}(...arguments)");
        tokio::time::timeout(PATIENCE, self.client.execute(&script, args))
            .await
            .unwrap_or_else(|_| panic!("harness.{function} did not answer"))
            .unwrap_or_else(|e| panic!("harness.{function} failed: {e}"))
    }

    /// Polls `harness[function](...args)` until `done` holds for its answer.
    pub async fn until(
        &self,
        what: &str,
        function: &str,
        args: Vec<Value>,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let value = self.call(function, args.clone()).await;
            if done(&value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what} (last: {value})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Only the chromedriver this test started; it takes its Chromium along.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn chromium_binary() -> String {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("chromium")
        .to_string()
}
