#!/usr/bin/env python3
"""Drives the GateSvr web console in headless Chromium (Selenium + chromedriver).

Run by scripts/console-check against a control plane with two data planes. Every step
asserts what the operator would see; the cluster's state is checked through the admin
API afterwards. Screenshots of every page go to --screenshots. Exits non-zero on the
first failed check.
"""

import argparse
import json
import pathlib
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait


def api(base, ctx, token, path, method="GET", body=None):
    req = urllib.request.Request(base + path, method=method, data=body)
    req.add_header("Authorization", "Bearer " + token)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.loads(r.read())


def wait_until(what, f, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--cacert", required=True)
    p.add_argument("--admin-token", required=True)
    p.add_argument("--read-token", required=True)
    p.add_argument("--screenshots", required=True)
    p.add_argument("--gatectl", required=True)
    p.add_argument("--dataplane-metrics", required=True, help="http://host:port of dp-1's metrics")
    a = p.parse_args()
    ctx = ssl.create_default_context(cafile=a.cacert)

    # Both data planes registered and live before the browser starts.
    def live_nodes():
        try:
            nodes = api(a.base, ctx, a.admin_token, "/v1/nodes")["nodes"]
        except OSError:
            return None
        ids = sorted(n["node_id"] for n in nodes if n["state"] == "active")
        return ids if ids == ["dp-1", "dp-2"] else None

    wait_until("dp-1 and dp-2 active", live_nodes, timeout=60)
    # One upstream instance for the zones page (nothing listens there: its health shows it).
    api(a.base, ctx, a.admin_token, "/v1/upstreams", "POST",
        json.dumps({"zone": "001", "address": "127.0.0.1:9", "service_name": "echo"}).encode())

    # gatectl upstreams health: each live node's view, through the control plane.
    def health():
        out = subprocess.run(
            [a.gatectl, "--endpoints", a.base, "--cacert", a.cacert, "--token", a.admin_token,
             "-o", "json", "upstreams", "health"], capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        v = json.loads(out.stdout)
        ok = set(v) == {"dp-1", "dp-2"} and all(
            any(u["address"] == "127.0.0.1:9" for u in v[n]["upstreams"]) for n in v)
        return v if ok else None

    wait_until("gatectl upstreams health lists the instance on both nodes", health)

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    # The admin port's certificate comes from a test CA the browser does not know.
    opts.accept_insecure_certs = True
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=opts)
    wait = WebDriverWait(driver, 15)
    step = [0]

    def shot(name):
        step[0] += 1
        driver.save_screenshot(f"{a.screenshots}/{step[0]:02d}-{name}.png")

    def text(css):
        return wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, css))).text

    try:
        # Not logged in: the console sends the browser to its login page.
        driver.get(a.base + "/console/nodes")
        wait.until(EC.url_contains("/console/login"))
        shot("login")
        # A wrong token is refused.
        driver.find_element(By.ID, "token").send_keys("not-a-token")
        driver.find_element(By.ID, "login").click()
        assert "not accepted" in text("#login-error"), "wrong token accepted"
        # The admin token logs in.
        driver.find_element(By.ID, "token").send_keys(a.admin_token)
        driver.find_element(By.ID, "login").click()
        wait.until(EC.presence_of_element_located((By.ID, "leader")))
        assert "Leader: 1" in text("#leader"), text("#leader")
        members = text("#members")
        assert "voter" in members and "(leader)" in members, members
        assert text("#live-nodes") == "2", text("#live-nodes")
        # Live rates: each node's counters, read through the control plane, become numbers.
        wait_until("rates filled", lambda: all(
            c.text.replace(".", "", 1).isdigit()
            for c in driver.find_elements(By.CSS_SELECTOR, "#rates .rate")), timeout=20)
        shot("overview")

        driver.find_element(By.LINK_TEXT, "Zones").click()
        zone = text("#zone-001")
        assert "127.0.0.1:9" in zone and "echo" in zone, zone
        assert "dp-1:" in zone and "dp-2:" in zone, "no health from the data planes: " + zone
        shot("zones")

        driver.find_element(By.LINK_TEXT, "Sessions").click()
        driver.find_element(By.ID, "openid").send_keys("nobody-here")
        driver.find_element(By.ID, "lookup").click()
        assert "has no session" in text("#no-session")
        shot("sessions")

        # Drain dp-2 from the console: the nodes page, the confirmation, the notice.
        driver.find_element(By.LINK_TEXT, "Nodes").click()
        assert text("#state-dp-2") == "active"
        shot("nodes")
        driver.find_element(By.ID, "drain-dp-2").click()
        assert "Drain data-plane node dp-2" in text("#question")
        shot("confirm-drain")
        driver.find_element(By.ID, "confirm").click()
        assert "dp-2: drain done" in text("#notice"), text("#notice")
        shot("drained")

        # Cordon dp-1 and take it back.
        driver.find_element(By.ID, "cordon-dp-1").click()
        driver.find_element(By.ID, "confirm").click()
        assert "dp-1: cordon done" in text("#notice")
        driver.find_element(By.ID, "uncordon-dp-1").click()
        driver.find_element(By.ID, "confirm").click()
        assert "dp-1: uncordon done" in text("#notice")

        # A read-only token sees the pages but cannot act.
        driver.find_element(By.ID, "logout").click()
        wait.until(EC.url_contains("/console/login"))
        driver.find_element(By.ID, "token").send_keys(a.read_token)
        driver.find_element(By.ID, "login").click()
        wait.until(EC.presence_of_element_located((By.ID, "leader")))
        driver.get(a.base + "/console/confirm?action=cordon&target=dp-1")
        driver.find_element(By.ID, "confirm").click()
        # Wait for the answer page (the click navigates; reading the old page is no answer).
        outcome = ("forbidden", "read-only", "cordon done")
        wait.until(lambda d: any(t in d.page_source for t in outcome))
        assert "forbidden" in driver.page_source or "read-only" in driver.page_source, \
            "a read-only token cordoned a node"
        shot("read-only-refused")
    except (AssertionError, TimeoutException):
        shot("failure")
        raise
    finally:
        driver.quit()

    # The cluster, through the API: dp-2 drains (and leaves), dp-1 active and uncordoned.
    def drained():
        nodes = {n["node_id"]: n for n in api(a.base, ctx, a.admin_token, "/v1/nodes")["nodes"]}
        d2, d1 = nodes.get("dp-2"), nodes.get("dp-1")
        ok = d2 and d2["state"] in ("draining", "left") and d1 and d1["state"] == "active" \
            and not d1["cordoned"]
        return nodes if ok else None

    nodes = wait_until("dp-2 draining or left", drained)

    # Both planes' /metrics, from the running processes: every control-plane series of
    # SERIES (controlplane/src/metrics.rs) and the data plane's alerting counters exist.
    root = pathlib.Path(__file__).resolve().parent.parent
    src = (root / "controlplane" / "src" / "metrics.rs").read_text()
    series = re.findall(r'"(gatesvr_cp_[a-z_]+)"', re.search(r"SERIES: &\[&str\] = &\[(.*?)\];", src, re.S).group(1))
    with urllib.request.urlopen(a.base + "/metrics", context=ctx, timeout=10) as r:
        cp_metrics = r.read().decode()
    missing = [m for m in series if ("\n" + m + " ") not in cp_metrics and ("\n" + m + "{") not in cp_metrics]
    assert series and not missing, f"control-plane /metrics lacks {missing}"
    with urllib.request.urlopen(a.dataplane_metrics + "/metrics", timeout=10) as r:
        dp_metrics = r.read().decode()
    for needle in ('gatesvr_connections_rejected_total{reason="max_connections"} 0',
                   'gatesvr_auth_failures_total{reason="invalid"} 0',
                   'gatesvr_connections_closed_total{code="slow_consumer"} 0'):
        assert needle in dp_metrics, f"data-plane /metrics lacks {needle}"
    print("console-check: ok; dp-2 is", nodes["dp-2"]["state"], "; screenshots in", a.screenshots)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("console-check: FAILED:", e, file=sys.stderr)
        sys.exit(1)
