// Test harness for the browser tests (tests/tests/browser.rs): WebDriver
// calls these functions and reads back plain JSON. Each client records every
// push the application received (after the SDK's in-order, once-only
// delivery) and every connection event.
import { Client } from "../gatesvr.js";

const clients = new Map();

function info(name) {
  const c = clients.get(name);
  return {
    sessionId: c.client.sessionId,
    nodeId: c.client.nodeId,
    transport: c.client.transport,
    lastAckedSeqId: c.client.lastAckedSeqId,
    closed: c.client.closedError ? c.client.closedError.message : null,
  };
}

window.harness = {
  async connect(name, options) {
    const client = await Client.connect({ backoff: { initialMs: 50, maxMs: 500 }, ...options });
    const record = { client, pushes: [], events: [] };
    for (const type of ["connected", "disconnected", "resumefailed", "goaway", "closed"]) {
      client.addEventListener(type, (e) => {
        const { error, ...rest } = e.detail ?? {};
        record.events.push({ type, ...rest, error: error ? error.message : undefined });
      });
    }
    client.addEventListener("push", (e) => {
      const p = e.detail;
      record.pushes.push({ seqId: p.seqId, content: p.content, redelivery: p.redelivery, sessionId: client.sessionId });
    });
    clients.set(name, record);
    return info(name);
  },
  info,
  async request(name, msgId, text) {
    try {
      const r = await clients.get(name).client.request(msgId, text);
      return { seqId: r.seqId, payload: new TextDecoder().decode(r.payload), appCode: r.appCode };
    } catch (e) {
      return { error: { kind: e.kind, code: e.code, message: e.message } };
    }
  },
  /** `count` sequential echo requests: round-trip percentiles in ms. */
  async rtt(name, count) {
    const client = clients.get(name).client;
    const times = [];
    for (let i = 0; i < count; i++) {
      const t0 = performance.now();
      await client.request(9, "rtt");
      times.push(performance.now() - t0);
    }
    times.sort((a, b) => a - b);
    const pct = (p) => times[Math.min(times.length - 1, Math.floor((p / 100) * times.length))];
    return { count, p50: pct(50), p99: pct(99) };
  },
  /** Opens `n` idle clients named prefix-0..; resolves with their transports. */
  async openMany(prefix, n, options) {
    const opened = [];
    for (let i = 0; i < n; i++) {
      const { tokens, ...rest } = options;
      const info = await window.harness.connect(`${prefix}-${i}`, { ...rest, openid: `${prefix}-${i}`, token: tokens[i] });
      opened.push(info.transport);
    }
    return opened;
  },
  async stopMany(prefix, n) {
    for (let i = 0; i < n; i++) await clients.get(`${prefix}-${i}`).client.stop();
  },
  pushes: (name) => clients.get(name).pushes,
  events: (name) => clients.get(name).events,
  setOptions(name, options) { Object.assign(clients.get(name).client.options, options); },
  simulateDisconnect(name) { clients.get(name).client.simulateDisconnect(); },
  async stop(name) { await clients.get(name).client.stop(); },
};
window.harnessReady = true;
