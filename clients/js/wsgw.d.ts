// TypeScript declarations for wsgw.js, the browser client of the wsgw.v1 protocol.

/** sendType of an envelope. */
export type SendType = "SERVER_TO_CLIENT" | "CLIENT_TO_SERVER" | "CLIENT_TO_CLIENT";

/** A business message as the gateway pushes it: every field is present, absent ones are null or []. */
export interface Envelope<Content = unknown> {
  messageId: string;
  sendType: SendType;
  messageType: string;
  businessType: string;
  fromUniqueId: string | null;
  fromClientType: string | null;
  toUniqueId: string | null;
  toClientType: string | null;
  /** Milliseconds since the Unix epoch, stamped at first publish. */
  timestamp: number | null;
  content: Content;
  tags: string[];
  businesses: string[];
}

/** An envelope for send(). The gateway sets fromUniqueId, fromClientType and timestamp. */
export interface OutgoingEnvelope<Content = unknown> {
  /** 1 to 128 visible ASCII characters, assigned with crypto.randomUUID() when missing. */
  messageId?: string;
  sendType: "CLIENT_TO_SERVER" | "CLIENT_TO_CLIENT";
  messageType: string;
  businessType: string;
  fromUniqueId?: string | null;
  fromClientType?: string | null;
  toUniqueId?: string | null;
  toClientType?: string | null;
  timestamp?: number | null;
  content?: Content;
  tags?: string[];
  businesses?: string[];
}

/** Delivery details of a pushed message. */
export interface MessageMeta {
  /** True when the broker delivered the message before, so this client may have seen it already. */
  redelivered: boolean;
  /** How often an operator re-published the message from the dead-letter queue. */
  replayCount: number;
}

/** The first frame of every session. */
export interface Welcome {
  type: "welcome";
  sessionId: string;
  node: string;
  uniqueId: string;
  clientType: string;
  protocol: string;
  pendingAckWindow: number;
}

/** Argument of the "close" event. */
export interface CloseInfo {
  /** The WebSocket close code; 1006 when the connection dropped without a close frame. */
  code: number;
  reason: string;
  wasClean: boolean;
  /** True when the connection had received its welcome frame. */
  opened: boolean;
  /** Close code 4001: a newer connection of the same identity took over, and the client has stopped. */
  replaced: boolean;
  /** Close code 4002: an operator closed the session, and the client reconnects after backoff.kickedMs. */
  kicked: boolean;
  willReconnect: boolean;
}

/** Argument of the "reconnecting" event. */
export interface ReconnectInfo {
  /** Number of the coming connect attempt since the last connection that stayed open. */
  attempt: number;
  /** Wait before that attempt, in milliseconds. */
  delayMs: number;
  reason: string;
}

/**
 * Error codes of the gateway's error frames, and the client's own codes. CONNECT_FAILED: no connection URL,
 * or an invalid one. HANDLER_FAILED: a "message" listener threw, and the client rejected the message.
 * QUEUE_FULL: maxQueuedMessages messages wait for the listeners, and the client dropped one unacked.
 * INVALID_SERVER_FRAME: the gateway sent a frame that is not valid JSON. TOO_MANY_PENDING and MESSAGE_TOO_BIG:
 * send() rejected the message. STOPPED and REPLACED: a pending send ended because the client stopped.
 */
export type WsgwErrorCode =
  | "INVALID_FRAME"
  | "INVALID_ENVELOPE"
  | "UNKNOWN_MESSAGE_ID"
  | "FORBIDDEN"
  | "UNAVAILABLE"
  | "UNROUTABLE"
  | "REFUSED"
  | "RATE_LIMITED"
  | "UNSUPPORTED"
  | "CONNECT_FAILED"
  | "HANDLER_FAILED"
  | "QUEUE_FULL"
  | "INVALID_SERVER_FRAME"
  | "TOO_MANY_PENDING"
  | "MESSAGE_TOO_BIG"
  | "STOPPED"
  | "REPLACED"
  | (string & {});

export class WsgwError extends Error {
  constructor(code: WsgwErrorCode, reason: string, messageId?: string | null, options?: ErrorOptions);
  readonly name: "WsgwError";
  readonly code: WsgwErrorCode;
  readonly reason: string;
  readonly messageId: string | null;
}

export interface BackoffOptions {
  /** Ceiling of the first reconnect delay. It doubles after each failed attempt. Default 500. */
  initialMs?: number;
  /** Maximum ceiling of a reconnect delay. Default 30000. */
  maxMs?: number;
  /** Wait after close code 4002 (kicked), at least maxMs. Default 60000. */
  kickedMs?: number;
  /** A connection open this long resets the backoff, unless it closed with 1002, 1007, 1008 or 1009. Default 10000. */
  stableMs?: number;
}

interface CommonOptions {
  /** messageTypes whose older message, by (timestamp, messageId), is stale once a newer one was handled. */
  replaceable?: Iterable<string>;
  /** Ack each message after the "message" listeners return or resolve. Default true. */
  autoAck?: boolean;
  backoff?: BackoffOptions;
  /** Time for getting a URL, and separately for the upgrade and welcome frame. Default 15000 ms. */
  connectTimeoutMs?: number;
  /** Recent messageIds remembered to drop duplicates. Default 1000. */
  dedupeCapacity?: number;
  /** Maximum messages waiting for the listeners. Further ones are dropped unacked. Default 1000. */
  maxQueuedMessages?: number;
  /** Maximum sends waiting for the gateway's confirm. Further send() calls reject. Default 256. */
  maxPendingSends?: number;
  /** Maximum unconfirmed sends on one connection, the gateway's session.max_sends_in_flight. Default 16. */
  maxSendsInFlight?: number;
  /** Maximum tries of a send that gets UNAVAILABLE or RATE_LIMITED before send() rejects. Default 10. */
  maxSendAttempts?: number;
  /** Maximum send frame in bytes, the gateway's session.max_message_size. Default 65536. */
  maxMessageBytes?: number;
}

export type WsgwClientOptions = CommonOptions &
  (
    | {
        /** A business endpoint that returns {"result":0,"description":"ok","data":"<ws url>"}. */
        tokenUrl: string | URL;
        getUrl?: never;
      }
    | {
        /** Returns a fresh connection URL. Called before every connect, because tokens are single use. */
        getUrl: () => string | Promise<string>;
        tokenUrl?: never;
      }
  );

export type ClientState = "idle" | "connecting" | "open" | "waiting" | "stopped";

export interface WsgwEvents {
  open: (welcome: Welcome) => void;
  /** Awaited. A throw or rejection rejects the message, so the gateway pushes it again. */
  message: (message: Envelope, meta: MessageMeta) => void | Promise<void>;
  /** A replaceable message older than one already handled. The client acked it. */
  stale: (message: Envelope, meta: MessageMeta) => void;
  close: (info: CloseInfo) => void;
  reconnecting: (info: ReconnectInfo) => void;
  error: (error: WsgwError) => void;
}

export class WsgwClient {
  constructor(options: WsgwClientOptions);
  readonly state: ClientState;
  readonly welcome: Welcome | null;
  on<Event extends keyof WsgwEvents>(event: Event, listener: WsgwEvents[Event]): this;
  off<Event extends keyof WsgwEvents>(event: Event, listener: WsgwEvents[Event]): this;
  start(): void;
  stop(): void;
  send<Content = unknown>(message: OutgoingEnvelope<Content>): Promise<{ messageId: string }>;
  ack(messageId: string): void;
  reject(messageId: string, reason?: string): void;
}
