// GateSvr JavaScript SDK: browsers on the same sessions as native clients.
//
// An ES module with no dependencies and no build step (types: gatesvr.d.ts).
// It speaks docs/protocol.md over WebTransport first (one bidirectional
// stream of varint-prefixed frames, self-signed dev certificates through
// `serverCertificateHashes`) and falls back to a WebSocket (one binary
// message per frame) where UDP is blocked. Like the Rust SDK it resumes the
// session after any disconnect from the last push it acknowledged, acks each
// push once the application's handler returned, numbers requests and resends
// unanswered ones with their original seq after a resume (the gateway runs
// each seq at most once), and reports the same error codes.
//
//   const client = await Client.connect({ endpoints: [{ webtransport, websocket }], openid, token });
//   client.addEventListener("push", (e) => console.log(e.detail.content));
//   const answer = await client.request(1, "echo hi");

/** Error codes of docs/protocol.md §8 (frozen; unknown codes mean INTERNAL). */
export const ErrorCode = Object.freeze({
  OK: 0, BAD_FRAME: 1, FRAME_TOO_LARGE: 2, PROTOCOL_VIOLATION: 3, UNAUTHENTICATED: 4,
  TOKEN_EXPIRED: 5, OPENID_MISMATCH: 6, SEQ_OUT_OF_WINDOW: 7, OVERLOADED: 8,
  UPSTREAM_TIMEOUT: 9, UPSTREAM_UNAVAILABLE: 10, UPSTREAM_ERROR: 11, UPSTREAM_OVERLOADED: 12,
  SLOW_CONSUMER: 13, SESSION_REPLACED: 14, HEARTBEAT_TIMEOUT: 15, ACK_TIMEOUT: 16,
  DRAINING: 17, INTERNAL: 18, SESSION_CLOSED: 19, START_TIMEOUT: 20, TOO_MANY_INFLIGHT: 21,
});

/** StartResponse.resume_status values (docs/protocol.md §4). */
export const ResumeStatus = Object.freeze({
  NEW: 0, RESUMED: 1, SESSION_EXPIRED: 2, TRIMMED: 3, SEQ_AHEAD: 4, RECOVERED: 5,
});

const CODE_NAMES = Object.fromEntries(Object.entries(ErrorCode).map(([k, v]) => [v, k]));

/** The name of an error code ("INTERNAL" for unknown ones). */
export function codeName(code) {
  return CODE_NAMES[code] ?? "INTERNAL";
}

/** Codes after which reconnecting cannot help (same list as the Rust SDK). */
const TERMINAL = new Set([
  ErrorCode.UNAUTHENTICATED, ErrorCode.TOKEN_EXPIRED, ErrorCode.OPENID_MISMATCH,
  ErrorCode.SESSION_REPLACED, ErrorCode.SESSION_CLOSED,
]);

/** WebSocket close codes are 4000 + ErrorCode (docs/protocol.md §12). */
const WS_CLOSE_BASE = 4000;

/** The client as a whole failed or was refused (Rust: ClientError). */
export class ClientError extends Error {
  constructor(kind, message, code = null) {
    super(message);
    this.name = "ClientError";
    /** "setup" | "connect" | "refused" | "closed" */
    this.kind = kind;
    /** For "refused": the ErrorCode. */
    this.code = code;
  }
}

/** One request failed (Rust: RequestError). */
export class RequestError extends Error {
  constructor(kind, message, code = null, retryAfterMs = 0) {
    super(message);
    this.name = "RequestError";
    /** "timeout" | "gateway" | "outcome_unknown" | "closed" */
    this.kind = kind;
    /** For "gateway": the ErrorCode. */
    this.code = code;
    /** For OVERLOADED / UPSTREAM_OVERLOADED: wait at least this long. */
    this.retryAfterMs = retryAfterMs;
  }
}

// ---------------------------------------------------------------------------
// Protobuf, the few messages of gatesvr.client.v1 (field numbers from
// proto/gatesvr/client/v1/client.proto). Integers are JS numbers: seqs and
// timestamps stay far below 2^53.

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

class Writer {
  constructor() { this.bytes = []; }
  varint(n) {
    n = Math.floor(Number(n));
    while (n >= 0x80) {
      this.bytes.push((n % 0x80) | 0x80);
      n = Math.floor(n / 0x80);
    }
    this.bytes.push(n);
    return this;
  }
  tag(field, wire) { return this.varint(field * 8 + wire); }
  uint(field, n) { return n ? this.tag(field, 0).varint(n) : this; }
  raw(field, data) {
    if (!data || data.length === 0) return this;
    this.tag(field, 2).varint(data.length);
    for (const b of data) this.bytes.push(b);
    return this;
  }
  string(field, s) { return this.raw(field, s ? utf8.encode(s) : null); }
  message(field, w) { this.tag(field, 2).varint(w.bytes.length); this.bytes.push(...w.bytes); return this; }
  finish() { return Uint8Array.from(this.bytes); }
}

/** Reads a varint at `pos`: [value, next position] or null if incomplete. */
function readVarint(buf, pos) {
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10; i++) {
    if (pos + i >= buf.length) return null;
    const b = buf[pos + i];
    value += (b & 0x7f) * scale;
    scale *= 128;
    if ((b & 0x80) === 0) return [value, pos + i + 1];
  }
  throw new Error("invalid varint");
}

/** Decodes one message into { field: value } (last value wins; bytes as Uint8Array). */
function fields(buf) {
  const out = {};
  let pos = 0;
  while (pos < buf.length) {
    const tag = readVarint(buf, pos);
    if (!tag) throw new Error("truncated field tag");
    const [key, at] = tag;
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === 0) {
      const v = readVarint(buf, at);
      if (!v) throw new Error("truncated varint");
      out[field] = v[0];
      pos = v[1];
    } else if (wire === 2) {
      const len = readVarint(buf, at);
      if (!len || len[1] + len[0] > buf.length) throw new Error("truncated bytes");
      out[field] = buf.subarray(len[1], len[1] + len[0]);
      pos = len[1] + len[0];
    } else if (wire === 1) {
      pos = at + 8;
    } else if (wire === 5) {
      pos = at + 4;
    } else {
      throw new Error(`unsupported wire type ${wire}`);
    }
  }
  return out;
}

const str = (f, n) => (f[n] ? fromUtf8.decode(f[n]) : "");
const num = (f, n) => f[n] ?? 0;
const bytes = (f, n) => (f[n] ? f[n].slice() : new Uint8Array());

/** Envelope body field numbers. */
const Body = {
  START: 1, START_OK: 2, HEARTBEAT: 3, HEARTBEAT_OK: 4, REQUEST: 5, RESPONSE: 6,
  PUSH: 7, ACK: 8, STOP: 9, GO_AWAY: 10, ERROR: 11,
};

/** One frame: varint(len) + Envelope{ body }. */
function frame(bodyField, message) {
  const envelope = new Writer().message(bodyField, message).finish();
  const w = new Writer().varint(envelope.length);
  const out = new Uint8Array(w.bytes.length + envelope.length);
  out.set(w.bytes, 0);
  out.set(envelope, w.bytes.length);
  return out;
}

const encode = {
  start: (s) => frame(Body.START, new Writer()
    .string(1, s.openid).string(2, s.authToken).uint(3, s.lastAckedSeqId)
    .string(4, s.sessionId).string(5, s.resumeToken).string(6, s.clientVersion)
    .uint(7, s.lastRequestSeqId)),
  heartbeat: (ts) => frame(Body.HEARTBEAT, new Writer().uint(1, ts)),
  request: (r) => frame(Body.REQUEST, new Writer().uint(1, r.msgId).uint(2, r.seqId).raw(4, r.payload)),
  ack: (seq) => frame(Body.ACK, new Writer().uint(1, seq)),
  stop: (reason) => frame(Body.STOP, new Writer().string(1, reason)),
};

/** Decodes an Envelope into { kind, ...fields }. */
function decodeEnvelope(buf) {
  const env = fields(buf);
  const field = Object.keys(env).map(Number).find((n) => n >= 1 && n <= 11);
  if (field === undefined) throw new Error("envelope has no body");
  const f = fields(env[field]);
  switch (field) {
    case Body.START_OK: return {
      kind: "start_ok", sessionId: str(f, 1), nodeId: str(f, 2), zone: str(f, 3),
      heartbeatIntervalMs: num(f, 4), nextSeqId: num(f, 5), resumeStatus: num(f, 7),
      firstAvailableSeqId: num(f, 8), serverTimeMs: num(f, 9), maxFrameSize: num(f, 10),
      requestWindow: num(f, 11), sessionTimeoutMs: num(f, 12),
    };
    case Body.HEARTBEAT_OK: return { kind: "heartbeat_ok", clientTimestamp: num(f, 1), serverTimestamp: num(f, 2) };
    case Body.RESPONSE: return {
      kind: "response", msgId: num(f, 1), seqId: num(f, 2), code: num(f, 3), payload: bytes(f, 4),
      message: str(f, 5), zone: str(f, 6), appCode: num(f, 7) > 0x7fffffff ? num(f, 7) - 2 ** 64 : num(f, 7),
      retryAfterMs: num(f, 8),
    };
    case Body.PUSH: return {
      kind: "push", seqId: num(f, 1), msgType: str(f, 2), content: str(f, 3), data: bytes(f, 4),
      createdAtMs: num(f, 5), redelivery: num(f, 6) === 1,
    };
    case Body.GO_AWAY: return {
      kind: "go_away", reason: str(f, 1), reconnectDelayMs: num(f, 2), targetAddr: str(f, 3), resumeToken: str(f, 4),
    };
    case Body.ERROR: return { kind: "error", code: num(f, 1), message: str(f, 2), retryAfterMs: num(f, 3), fatal: num(f, 4) === 1 };
    default: return { kind: "client_only", field };
  }
}

/** Reassembles varint-prefixed frames from a byte stream (WebTransport). */
class FrameReader {
  constructor(maxFrameSize) { this.buf = new Uint8Array(0); this.max = maxFrameSize; }
  push(chunk) {
    const merged = new Uint8Array(this.buf.length + chunk.length);
    merged.set(this.buf, 0);
    merged.set(chunk, this.buf.length);
    this.buf = merged;
  }
  /** The next whole Envelope's bytes, or null if more bytes are needed. */
  next() {
    const len = readVarint(this.buf, 0);
    if (!len) return null;
    if (len[0] > this.max) throw new Error(`frame of ${len[0]} bytes exceeds ${this.max}`);
    if (this.buf.length < len[1] + len[0]) return null;
    const body = this.buf.subarray(len[1], len[1] + len[0]);
    this.buf = this.buf.subarray(len[1] + len[0]);
    return body;
  }
}

/** Strips the prefix of a WebSocket message, which holds exactly one frame. */
function unwrapMessage(data) {
  const buf = new Uint8Array(data);
  const len = readVarint(buf, 0);
  if (!len || len[1] + len[0] !== buf.length) throw new Error("a message must carry exactly one frame");
  return buf.subarray(len[1]);
}

// ---------------------------------------------------------------------------
// Transports: each gives { transport, send(frames), close(), closed: Promise<{code, reason}> }
// and calls onEnvelope(bytes) per frame.

function base64ToBytes(b64) {
  const bin = atob(b64);
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: timed out`)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

async function openWebTransport(url, options, onEnvelope) {
  if (typeof WebTransport === "undefined") throw new Error("WebTransport is not available in this browser");
  const init = {};
  if (options.serverCertificateHashes?.length) {
    init.serverCertificateHashes = options.serverCertificateHashes.map((h) => ({
      algorithm: "sha-256", value: base64ToBytes(h),
    }));
  }
  const wt = new WebTransport(url, init);
  wt.closed.catch(() => {});
  try {
    await withTimeout(wt.ready, options.connectTimeoutMs, "WebTransport handshake");
  } catch (e) {
    try { wt.close(); } catch { /* already closed */ }
    throw e;
  }
  const stream = await wt.createBidirectionalStream();
  const writer = stream.writable.getWriter();
  const reader = stream.readable.getReader();
  const frames = new FrameReader(options.maxFrameSize);
  let resolveClosed;
  const closed = new Promise((r) => { resolveClosed = r; });
  (async () => {
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        frames.push(value);
        for (let body = frames.next(); body; body = frames.next()) onEnvelope(body);
      }
      resolveClosed({ code: null, reason: "stream ended" });
    } catch (e) {
      resolveClosed({ code: null, reason: String(e?.message ?? e) });
    }
  })();
  wt.closed.then(
    (info) => resolveClosed({ code: null, reason: info?.reason || "session closed" }),
    (e) => resolveClosed({ code: null, reason: String(e?.message ?? e) }),
  );
  return {
    transport: "webtransport",
    send(frameList) {
      let total = 0;
      for (const f of frameList) total += f.length;
      const out = new Uint8Array(total);
      let at = 0;
      for (const f of frameList) { out.set(f, at); at += f.length; }
      return writer.write(out);
    },
    close() { try { wt.close(); } catch { /* already closed */ } },
    closed,
  };
}

async function openWebSocket(url, options, onEnvelope) {
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  let resolveClosed;
  const closed = new Promise((r) => { resolveClosed = r; });
  ws.onclose = (e) => resolveClosed({
    code: e.code >= WS_CLOSE_BASE && e.code < WS_CLOSE_BASE + 1000 ? e.code - WS_CLOSE_BASE : null,
    reason: e.reason || `WebSocket closed (${e.code})`,
  });
  await withTimeout(new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("WebSocket connection failed"));
  }), options.connectTimeoutMs, "WebSocket connect").catch((e) => { ws.close(); throw e; });
  ws.onmessage = (e) => {
    if (typeof e.data === "string") return;
    try {
      onEnvelope(unwrapMessage(e.data));
    } catch (err) {
      ws.close(1002, "bad frame");
    }
  };
  return {
    transport: "websocket",
    send(frameList) {
      try {
        for (const f of frameList) ws.send(f);
        return Promise.resolve();
      } catch (e) {
        return Promise.reject(e);
      }
    },
    close() { try { ws.close(1000); } catch { /* already closed */ } },
    closed,
  };
}

// ---------------------------------------------------------------------------

const DEFAULTS = {
  transports: ["webtransport", "websocket"],
  connectTimeoutMs: 5000,
  requestTimeoutMs: 30000,
  backoff: { initialMs: 100, maxMs: 5000, maxAttempts: null },
  maxFrameSize: 1 << 20,
  reconnect: true,
};

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * A GateSvr client. Events (an EventTarget; `detail` holds the data):
 * `push`, `connected`, `resumefailed`, `disconnected`, `goaway`, `closed`.
 */
export class Client extends EventTarget {
  /** Connects and starts (or resumes) a session; rejects if the first attempt fails. */
  static async connect(options) {
    const client = new Client(options);
    await client._open(true);
    client._driveLoop();
    return client;
  }

  constructor(options) {
    super();
    if (!options?.openid) throw new ClientError("setup", "openid is required");
    if (!options.endpoints?.length) throw new ClientError("setup", "at least one endpoint is required");
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options.backoff } };
    this.sessionId = "";
    this.nodeId = "";
    this.zone = "";
    /** Which transport carries the current connection. */
    this.transport = null;
    this._endpoint = 0;
    this._nextSeq = 1;
    /** seq -> { msgId, payload, resolve, reject, sent, timer } */
    this._pending = new Map();
    this._lastDelivered = 0;
    this._ackPoint = 0;
    this._ackSent = 0;
    this._conn = null;
    this._closedError = null;
    this._stopping = false;
    this._heartbeat = null;
    this._connEnded = null;
    this._goaway = null;
  }

  /** The highest push seq the application processed (what is acked). */
  get lastAckedSeqId() { return this._ackPoint; }

  /** Why the client closed, or null while it runs. */
  get closedError() { return this._closedError; }

  /**
   * Sends a request; resolves with the answer ({ msgId, seqId, payload, zone, appCode, message })
   * or rejects with a RequestError. Strings are sent as UTF-8.
   */
  request(msgId, payload) {
    if (this._closedError) return Promise.reject(new RequestError("closed", "client closed"));
    const data = typeof payload === "string" ? utf8.encode(payload) : new Uint8Array(payload ?? []);
    const seqId = this._nextSeq++;
    return new Promise((resolve, reject) => {
      const p = { msgId, payload: data, resolve, reject, sent: false };
      p.timer = setTimeout(() => {
        if (this._pending.get(seqId) === p) {
          this._pending.delete(seqId);
          reject(new RequestError("timeout", "request timed out"));
        }
      }, this.options.requestTimeoutMs);
      this._pending.set(seqId, p);
      this._sendPending();
    });
  }

  /** Ends the session for good (StopRequest) and closes. */
  async stop() {
    this._stopping = true;
    const conn = this._conn;
    if (conn) {
      try { await conn.send([encode.stop("client stop")]); } catch { /* gone */ }
      await withTimeout(conn.closed, 2000, "stop").catch(() => {});
      conn.close();
    }
    this._finish(new ClientError("closed", "stopped"));
  }

  /** Drops the connection as a network loss would; the client resumes (tests, demos). */
  simulateDisconnect() {
    if (this._conn) {
      const conn = this._conn;
      conn.close();
      this._connEnded?.({ code: null, reason: "simulated disconnect" });
    }
  }

  // --- connection lifecycle ---

  _endpointOrder() {
    const eps = this.options.endpoints;
    return eps.map((_, i) => eps[(this._endpoint + i) % eps.length]);
  }

  async _dial(onEnvelope) {
    const errors = [];
    for (const [i, ep] of this._endpointOrder().entries()) {
      for (const kind of this.options.transports) {
        // A GoAway target is a node's QUIC address: WebTransport shares it.
        const target = this._goaway?.url && kind === "webtransport" ? this._goaway.url : null;
        const url = target ?? ep[kind];
        if (!url) continue;
        // Which node a target is is unknown here: any configured hash may pin it.
        const hashes = target ? this._allHashes() : (ep.serverCertificateHashes ?? this.options.serverCertificateHashes);
        try {
          const conn = kind === "webtransport"
            ? await openWebTransport(url, { ...this.options, serverCertificateHashes: hashes }, onEnvelope)
            : await openWebSocket(url, this.options, onEnvelope);
          this._endpoint = (this._endpoint + i) % this.options.endpoints.length;
          return conn;
        } catch (e) {
          errors.push(`${kind} ${url}: ${e?.message ?? e}`);
        }
      }
    }
    throw new ClientError("connect", errors.join("; ") || "no transport configured");
  }

  _allHashes() {
    const all = [...(this.options.serverCertificateHashes ?? [])];
    for (const ep of this.options.endpoints) all.push(...(ep.serverCertificateHashes ?? []));
    return [...new Set(all)];
  }

  /** Opens a connection and completes Start. */
  async _open(first) {
    let startResolve;
    let startReject;
    const started = new Promise((res, rej) => { startResolve = res; startReject = rej; });
    let gotStart = false;
    const queue = [];
    const onEnvelope = (bytes) => {
      let msg;
      try {
        msg = decodeEnvelope(bytes);
      } catch (e) {
        this._connEnded?.({ code: ErrorCode.BAD_FRAME, reason: String(e.message) });
        return;
      }
      if (!gotStart) {
        if (msg.kind === "start_ok") { gotStart = true; startResolve(msg); return; }
        if (msg.kind === "error") { startReject({ code: msg.code, reason: msg.message }); return; }
        queue.push(msg);
        return;
      }
      this._onMessage(msg);
    };
    const conn = await this._dial(onEnvelope);
    conn.closed.then((c) => startReject(c));
    const token = typeof this.options.token === "function" ? await this.options.token() : this.options.token;
    const resuming = this.sessionId !== "";
    await conn.send([encode.start({
      openid: this.options.openid,
      authToken: token ?? "",
      lastAckedSeqId: resuming ? this._ackPoint : 0,
      sessionId: this.sessionId,
      resumeToken: this._goaway?.resumeToken ?? "",
      clientVersion: "gatesvr-sdk-js/0.1.0",
      lastRequestSeqId: this._nextSeq - 1,
    })]);
    let ok;
    try {
      ok = await withTimeout(started, this.options.connectTimeoutMs, "StartResponse");
    } catch (e) {
      conn.close();
      const code = e?.code ?? null;
      if (code !== null && TERMINAL.has(code)) {
        throw new ClientError("refused", `gateway refused the session: ${codeName(code)}: ${e.reason}`, code);
      }
      throw new ClientError("connect", `${codeName(code ?? ErrorCode.INTERNAL)}: ${e?.reason ?? e?.message ?? e}`);
    }
    this._goaway = null;
    this._conn = conn;
    this.transport = conn.transport;
    this._applyStart(ok, resuming, first);
    let ended;
    this._connEnded = null;
    const endedPromise = new Promise((r) => { ended = r; });
    this._connEnded = ended;
    conn.closed.then(ended);
    this._ended = endedPromise;
    this._startHeartbeat(ok.heartbeatIntervalMs);
    for (const msg of queue) this._onMessage(msg);
    this._sendPending();
  }

  _applyStart(ok, resuming, first) {
    const old = this.sessionId;
    const lastAcked = this._ackPoint;
    const sameSession = resuming && ok.sessionId === old;
    if (!sameSession) {
      // A new session: push and request seqs start over. Requests sent on
      // the old one may have run: fail them, renumber the unsent ones.
      this._lastDelivered = 0;
      this._ackPoint = 0;
      const pending = [...this._pending.entries()].sort((a, b) => a[0] - b[0]);
      this._pending = new Map();
      let next = 1;
      for (const [, p] of pending) {
        if (p.sent) {
          clearTimeout(p.timer);
          p.reject(new RequestError("outcome_unknown", "session lost while the request was in flight; outcome unknown"));
        } else {
          this._pending.set(next++, p);
        }
      }
      this._nextSeq = next;
    }
    if (ok.resumeStatus === ResumeStatus.TRIMMED && ok.firstAvailableSeqId > this._lastDelivered + 1) {
      this._lastDelivered = ok.firstAvailableSeqId - 1;
      this._ackPoint = Math.max(this._ackPoint, this._lastDelivered);
    }
    this.sessionId = ok.sessionId;
    this.nodeId = ok.nodeId;
    this.zone = ok.zone;
    this._ackSent = this._ackPoint;
    for (const p of this._pending.values()) p.sent = false;
    if (resuming && ok.resumeStatus !== ResumeStatus.RESUMED) {
      this._emit("resumefailed", { status: ok.resumeStatus, lastAckedSeqId: lastAcked, firstAvailableSeqId: ok.firstAvailableSeqId });
    }
    this._emit("connected", { sessionId: ok.sessionId, nodeId: ok.nodeId, zone: ok.zone, status: ok.resumeStatus, transport: this.transport, first });
  }

  _startHeartbeat(intervalMs) {
    clearInterval(this._heartbeat);
    const conn = this._conn;
    this._heartbeat = setInterval(() => {
      if (this._conn === conn) conn.send([encode.heartbeat(Date.now())]).catch(() => {});
    }, Math.max(100, intervalMs || 10000));
  }

  _onMessage(msg) {
    switch (msg.kind) {
      case "push": {
        if (msg.seqId <= this._lastDelivered) return; // duplicate after a resume or retransmit
        if (msg.seqId !== this._lastDelivered + 1) {
          // A gap: resume from what we have.
          this._connEnded?.({ code: null, reason: "gap in pushes" });
          return;
        }
        this._lastDelivered = msg.seqId;
        const { kind, ...push } = msg;
        this._emit("push", push);
        // The handler returned: the push is processed.
        this._ackPoint = msg.seqId;
        this._scheduleAck();
        return;
      }
      case "response": {
        const p = this._pending.get(msg.seqId);
        if (!p) return;
        this._pending.delete(msg.seqId);
        clearTimeout(p.timer);
        if (msg.code === ErrorCode.OK) {
          p.resolve({ msgId: msg.msgId, seqId: msg.seqId, payload: msg.payload, zone: msg.zone, appCode: msg.appCode, message: msg.message });
        } else {
          p.reject(new RequestError("gateway", `gateway error ${codeName(msg.code)}: ${msg.message}`, msg.code, msg.retryAfterMs));
        }
        return;
      }
      case "go_away":
        this._goaway = {
          delayMs: msg.reconnectDelayMs,
          url: msg.targetAddr ? `https://${msg.targetAddr}/gatesvr/v1` : null,
          resumeToken: msg.resumeToken,
        };
        this._emit("goaway", { reconnectDelayMs: msg.reconnectDelayMs, targetAddr: msg.targetAddr });
        this._connEnded?.({ code: ErrorCode.DRAINING, reason: "server asked to reconnect" });
        return;
      case "error":
        if (msg.fatal) this._connEnded?.({ code: msg.code, reason: msg.message });
        return;
      default:
        return;
    }
  }

  _scheduleAck() {
    if (this._ackQueued) return;
    this._ackQueued = true;
    queueMicrotask(() => {
      this._ackQueued = false;
      if (this._conn && this._ackPoint > this._ackSent) {
        this._ackSent = this._ackPoint;
        this._conn.send([encode.ack(this._ackPoint)]).catch(() => {});
      }
    });
  }

  _sendPending() {
    if (!this._conn) return;
    const frames = [];
    for (const [seqId, p] of [...this._pending.entries()].sort((a, b) => a[0] - b[0])) {
      if (p.sent) continue;
      p.sent = true;
      frames.push(encode.request({ msgId: p.msgId, seqId, payload: p.payload }));
    }
    if (frames.length) this._conn.send(frames).catch(() => {});
  }

  async _driveLoop() {
    let failures = 0;
    while (!this._closedError) {
      const end = await this._ended;
      const conn = this._conn;
      this._conn = null;
      clearInterval(this._heartbeat);
      conn?.close();
      if (this._stopping || this._closedError) return;
      if (end.code !== null && TERMINAL.has(end.code)) {
        this._finish(new ClientError("refused", `${codeName(end.code)}: ${end.reason}`, end.code));
        return;
      }
      this._emit("disconnected", { code: end.code, reason: end.reason });
      if (!this.options.reconnect) {
        this._finish(new ClientError("closed", end.reason));
        return;
      }
      let delay = this._goaway ? this._goaway.delayMs + Math.random() * 100 : 0;
      for (;;) {
        await sleep(delay);
        if (this._closedError) return;
        try {
          await this._open(false);
          failures = 0;
          break;
        } catch (e) {
          if (e instanceof ClientError && e.kind === "refused") {
            this._finish(e);
            return;
          }
          failures += 1;
          this._goaway = null;
          this._endpoint = (this._endpoint + 1) % this.options.endpoints.length;
          const b = this.options.backoff;
          if (b.maxAttempts && failures >= b.maxAttempts) {
            this._finish(new ClientError("closed", `gave up reconnecting: ${e.message}`));
            return;
          }
          const base = Math.min(b.maxMs, b.initialMs * 2 ** Math.min(failures - 1, 16));
          delay = base / 2 + Math.random() * base / 2;
        }
      }
    }
  }

  _finish(err) {
    if (this._closedError) return;
    this._closedError = err;
    clearInterval(this._heartbeat);
    for (const p of this._pending.values()) {
      clearTimeout(p.timer);
      p.reject(new RequestError("closed", "client closed"));
    }
    this._pending.clear();
    this._emit("closed", { error: err });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** Fetches the server's certificate hashes (for `serverCertificateHashes`) from `GET /gatesvr/v1/cert-hashes`. */
export async function fetchCertificateHashes(origin) {
  const res = await fetch(new URL("/gatesvr/v1/cert-hashes", origin));
  if (!res.ok) throw new ClientError("setup", `cert-hashes: HTTP ${res.status}`);
  return (await res.json()).sha256;
}

/** Internals exposed for tests of the wire format. */
export const wire = { encode, decodeEnvelope, FrameReader, unwrapMessage };
