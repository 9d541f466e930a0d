// Types of gatesvr.js (hand-written; the module needs no build step).

export declare const ErrorCode: Readonly<{
  OK: 0; BAD_FRAME: 1; FRAME_TOO_LARGE: 2; PROTOCOL_VIOLATION: 3; UNAUTHENTICATED: 4;
  TOKEN_EXPIRED: 5; OPENID_MISMATCH: 6; SEQ_OUT_OF_WINDOW: 7; OVERLOADED: 8;
  UPSTREAM_TIMEOUT: 9; UPSTREAM_UNAVAILABLE: 10; UPSTREAM_ERROR: 11; UPSTREAM_OVERLOADED: 12;
  SLOW_CONSUMER: 13; SESSION_REPLACED: 14; HEARTBEAT_TIMEOUT: 15; ACK_TIMEOUT: 16;
  DRAINING: 17; INTERNAL: 18; SESSION_CLOSED: 19; START_TIMEOUT: 20; TOO_MANY_INFLIGHT: 21;
}>;
export type ErrorCodeValue = (typeof ErrorCode)[keyof typeof ErrorCode];

export declare const ResumeStatus: Readonly<{
  NEW: 0; RESUMED: 1; SESSION_EXPIRED: 2; TRIMMED: 3; SEQ_AHEAD: 4; RECOVERED: 5;
}>;
export type ResumeStatusValue = (typeof ResumeStatus)[keyof typeof ResumeStatus];

/** The name of an error code ("INTERNAL" for unknown ones). */
export declare function codeName(code: number): keyof typeof ErrorCode;

export type TransportKind = "webtransport" | "websocket";

/** One gateway node, reachable over either transport. */
export interface Endpoint {
  /** `https://host:port/gatesvr/v1` (the node's QUIC port). */
  webtransport?: string;
  /** `wss://host:port/gatesvr/v1` (the node's WebSocket port). */
  websocket?: string;
  /** Base64 SHA-256 hashes of this node's certificate (self-signed / dev). */
  serverCertificateHashes?: string[];
}

export interface ClientOptions {
  endpoints: Endpoint[];
  openid: string;
  /** The auth token, or a function returning one for each (re)connect. */
  token: string | (() => string | Promise<string>);
  /** Tried in this order on each (re)connect. Default ["webtransport", "websocket"]. */
  transports?: TransportKind[];
  /** Hashes for every endpoint without its own. */
  serverCertificateHashes?: string[];
  /** Per transport attempt and for the StartResponse. Default 5000. */
  connectTimeoutMs?: number;
  /** Default 30000. */
  requestTimeoutMs?: number;
  /** Reconnect backoff with jitter. Defaults 100 ms .. 5000 ms, unlimited attempts. */
  backoff?: { initialMs?: number; maxMs?: number; maxAttempts?: number | null };
  /** Largest frame accepted from the server. Default 1 MiB. */
  maxFrameSize?: number;
  /** Reconnect and resume after a disconnect. Default true. */
  reconnect?: boolean;
}

export interface Response {
  msgId: number;
  seqId: number;
  payload: Uint8Array;
  zone: string;
  /** The upstream's own status (0 = success). */
  appCode: number;
  message: string;
}

export interface Push {
  seqId: number;
  msgType: string;
  content: string;
  data: Uint8Array;
  createdAtMs: number;
  /** The gateway had sent this seq before (the SDK still delivers it once). */
  redelivery: boolean;
}

export interface ClientEventMap {
  push: CustomEvent<Push>;
  connected: CustomEvent<{ sessionId: string; nodeId: string; zone: string; status: ResumeStatusValue; transport: TransportKind; first: boolean }>;
  resumefailed: CustomEvent<{ status: ResumeStatusValue; lastAckedSeqId: number; firstAvailableSeqId: number }>;
  disconnected: CustomEvent<{ code: ErrorCodeValue | null; reason: string }>;
  goaway: CustomEvent<{ reconnectDelayMs: number; targetAddr: string }>;
  closed: CustomEvent<{ error: ClientError }>;
}

export declare class ClientError extends Error {
  readonly kind: "setup" | "connect" | "refused" | "closed";
  readonly code: ErrorCodeValue | null;
}

export declare class RequestError extends Error {
  readonly kind: "timeout" | "gateway" | "outcome_unknown" | "closed";
  readonly code: ErrorCodeValue | null;
  readonly retryAfterMs: number;
}

export declare class Client extends EventTarget {
  static connect(options: ClientOptions): Promise<Client>;
  readonly options: Required<ClientOptions>;
  readonly sessionId: string;
  readonly nodeId: string;
  readonly zone: string;
  readonly transport: TransportKind | null;
  readonly lastAckedSeqId: number;
  readonly closedError: ClientError | null;
  /** Resolves with the answer or rejects with a RequestError. */
  request(msgId: number, payload: string | Uint8Array): Promise<Response>;
  /** Ends the session for good. */
  stop(): Promise<void>;
  /** Drops the connection as a network loss would; the client resumes. */
  simulateDisconnect(): void;
  addEventListener<K extends keyof ClientEventMap>(type: K, listener: (ev: ClientEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof ClientEventMap>(type: K, listener: (ev: ClientEventMap[K]) => void, options?: boolean | EventListenerOptions): void;
}

/** Fetches `GET /gatesvr/v1/cert-hashes` from a node's WebSocket (HTTPS) origin. */
export declare function fetchCertificateHashes(origin: string | URL): Promise<string[]>;
