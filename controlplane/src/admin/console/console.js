// GateSvr console: live request, error and push rates. Every element
// <span class="rate" data-node="N" data-kind="requests|errors|pushes"> is filled from
// node N's counters (GET /v1/nodes/N/stats, the console's cookie authenticates it):
// the rate is the change between two polls divided by the time between them.
"use strict";
(function () {
  const POLL_MS = 2000;
  const cells = Array.from(document.querySelectorAll(".rate[data-node]"));
  if (cells.length === 0) return;
  const nodes = Array.from(new Set(cells.map((c) => c.dataset.node)));
  const last = {};

  function totals(stats) {
    let requests = 0, errors = 0, pushes = 0;
    for (const [outcome, n] of Object.entries(stats.requests_by_outcome || {})) {
      requests += n;
      if (outcome !== "ok") errors += n;
    }
    pushes = (stats.pushes_by_outcome || {}).queued || 0;
    return { requests, errors, pushes, at: performance.now() };
  }

  function show(node, values) {
    for (const c of cells) {
      if (c.dataset.node !== node) continue;
      c.textContent = values === null ? "n/a" : values[c.dataset.kind].toFixed(1);
      c.title = values === null ? "this node's stats are not reachable from the control plane" : "";
    }
  }

  async function poll(node) {
    try {
      const r = await fetch("/v1/nodes/" + encodeURIComponent(node) + "/stats", {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!r.ok) { show(node, null); return; }
      const now = totals(await r.json());
      const prev = last[node];
      last[node] = now;
      if (!prev) return;
      const secs = (now.at - prev.at) / 1000;
      if (secs <= 0) return;
      show(node, {
        requests: Math.max(0, now.requests - prev.requests) / secs,
        errors: Math.max(0, now.errors - prev.errors) / secs,
        pushes: Math.max(0, now.pushes - prev.pushes) / secs,
      });
    } catch (e) {
      show(node, null);
    }
  }

  function tick() {
    nodes.forEach(poll);
  }
  tick();
  setInterval(tick, POLL_MS);
})();
