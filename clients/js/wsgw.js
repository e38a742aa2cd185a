// Browser client for the wsgw.v1 WebSocket protocol (docs/protocol.md in the wsgw repository).
//
// The client fetches a fresh connection URL before every connect, because tokens are single use. It
// reconnects with exponential backoff and full jitter, acks each message after the handler has processed it,
// drops duplicates and stale messages of replaceable types, and resends its own messages under the same
// messageId until the gateway confirms them. It has no runtime dependencies.

const PROTOCOL = "wsgw.v1";

const CLOSE_NORMAL = 1000;
const CLOSE_ABNORMAL = 1006;
const CLOSE_REPLACED = 4001;
const CLOSE_KICKED = 4002;

// Close codes that mean the client broke a rule (1002 protocol error, 1007 invalid payload, 1008 policy
// violation, 1009 message too big). The client still reconnects, but never resets its backoff after them.
const CLIENT_FAULT_CLOSES = new Set([1002, 1007, 1008, 1009]);

// Error codes of a send that the gateway did not publish for a passing reason. The send is retried.
const RETRIED_SEND_ERRORS = new Set(["UNAVAILABLE", "RATE_LIMITED"]);

const ENVELOPE_FIELDS = new Set([
  "messageId",
  "sendType",
  "messageType",
  "businessType",
  "fromUniqueId",
  "fromClientType",
  "toUniqueId",
  "toClientType",
  "timestamp",
  "content",
  "tags",
  "businesses",
]);
const OPTIONAL_TEXT_FIELDS = ["fromUniqueId", "fromClientType", "toUniqueId", "toClientType"];
const CLIENT_SEND_TYPES = new Set(["CLIENT_TO_SERVER", "CLIENT_TO_CLIENT"]);
const MESSAGE_ID_PATTERN = /^[!-~]{1,128}$/;

const EVENTS = new Set(["open", "message", "stale", "close", "reconnecting", "error"]);

const DEFAULT_BACKOFF = {
  initialMs: 500,
  maxMs: 30_000,
  kickedMs: 60_000,
  stableMs: 10_000,
};

const DEFAULT_OPTIONS = {
  autoAck: true,
  connectTimeoutMs: 15_000,
  dedupeCapacity: 1_000,
  maxQueuedMessages: 1_000,
  maxPendingSends: 256,
  maxSendsInFlight: 16,
  maxSendAttempts: 10,
  maxMessageBytes: 65_536,
};

/** An error frame of the gateway, or a failure of the client itself, with a machine-readable code. */
export class WsgwError extends Error {
  constructor(code, reason, messageId = null, options = undefined) {
    const suffix = messageId ? ` (messageId ${messageId})` : "";
    super(`${code}: ${reason}${suffix}`, options);
    this.name = "WsgwError";
    this.code = code;
    this.reason = reason;
    this.messageId = messageId;
  }
}

/** A reconnecting wsgw.v1 client. See README.md beside this file. */
export class WsgwClient {
  #options;
  #backoff;
  #replaceable;
  #listeners = new Map();

  #state = "idle";
  #socket = null;
  // Incremented for every connect attempt and by stop(), so callbacks of an older attempt can tell that they
  // are stale.
  #generation = 0;
  #failures = 0;
  #welcome = null;
  #openedAt = 0;
  #reconnectTimer = null;
  #welcomeTimer = null;

  // messageId -> "queued" | "handling" | "handled" | "acked", for the last `dedupeCapacity` messages.
  // "handled" means that the handler returned and the application has not acked yet (autoAck: false).
  #seen = new Map();
  // messageIds pushed on the current connection that the client has not acked or rejected yet.
  #unacked = new Set();
  // Replaceable messageType -> order key [timestamp, messageId] of the newest message handed to the handler.
  #newest = new Map();
  // Messages waiting for the handler, in the order the gateway pushed them.
  #inbox = [];
  #draining = false;

  // messageId -> pending send, in the order of the send() calls.
  #pending = new Map();

  /** Checks the options; start() connects. wsgw.d.ts describes every option. */
  constructor(options) {
    if (options === null || typeof options !== "object") {
      throw new TypeError("WsgwClient needs an options object with tokenUrl or getUrl");
    }
    const hasTokenUrl = options.tokenUrl !== undefined && options.tokenUrl !== null;
    const hasGetUrl = typeof options.getUrl === "function";
    if (hasTokenUrl === hasGetUrl) {
      throw new TypeError("WsgwClient needs exactly one of the options tokenUrl (a URL) and getUrl (a function)");
    }
    this.#options = { ...DEFAULT_OPTIONS, ...options };
    this.#backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    for (const name of ["initialMs", "maxMs", "kickedMs", "stableMs"]) {
      const value = this.#backoff[name];
      if (!Number.isFinite(value) || value < 0) {
        throw new TypeError(`backoff.${name} must be a number of milliseconds >= 0, got ${value}`);
      }
    }
    this.#replaceable = new Set(options.replaceable ?? []);
  }

  /** Connection state: "idle", "connecting", "open", "waiting" (for a reconnect) or "stopped". */
  get state() {
    return this.#state;
  }

  /** The welcome frame of the open connection, or null while no connection is open. */
  get welcome() {
    return this.#welcome;
  }

  /** Adds a listener for one of the events "open", "message", "stale", "close", "reconnecting" and "error". */
  on(event, listener) {
    if (!EVENTS.has(event)) {
      throw new TypeError(`unknown event ${JSON.stringify(event)}; use one of ${[...EVENTS].join(", ")}`);
    }
    if (typeof listener !== "function") {
      throw new TypeError(`the listener for ${event} must be a function`);
    }
    if (!this.#listeners.has(event)) {
      this.#listeners.set(event, new Set());
    }
    this.#listeners.get(event).add(listener);
    return this;
  }

  /** Removes a listener added with on(). */
  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
    return this;
  }

  /** Connects, and keeps reconnecting until stop() or a close with code 4001 (replaced). */
  start() {
    if (this.#state !== "idle" && this.#state !== "stopped") {
      return;
    }
    this.#failures = 0;
    this.#connect();
  }

  /** Closes the connection, cancels reconnects and rejects the sends that the gateway has not confirmed. */
  stop() {
    if (this.#state === "stopped") {
      return;
    }
    const socket = this.#socket;
    const opened = this.#state === "open";
    this.#generation += 1;
    this.#socket = null;
    this.#welcome = null;
    this.#unacked.clear();
    if (socket !== null) {
      detach(socket);
      socket.close(CLOSE_NORMAL, "client stopped");
      this.#emit("close", closeInfo(CLOSE_NORMAL, "client stopped", true, false, opened));
    }
    this.#halt("STOPPED", "the client was stopped before the gateway confirmed the message");
  }

  /**
   * Sends an envelope (sendType CLIENT_TO_SERVER or CLIENT_TO_CLIENT). Resolves with {messageId} when the
   * gateway confirms it, and rejects with a WsgwError when the gateway refuses it or the client stops.
   */
  send(message) {
    if (this.#state === "stopped") {
      return Promise.reject(new WsgwError("STOPPED", "the client is stopped; call start() before send()"));
    }

    let envelope;
    let text;
    try {
      envelope = prepareEnvelope(message);
      text = JSON.stringify({ type: "send", message: envelope });
    } catch (error) {
      if (error instanceof WsgwError) {
        return Promise.reject(error);
      }
      return Promise.reject(
        new WsgwError("INVALID_ENVELOPE", `the envelope is not JSON: ${error.message}`, null, { cause: error }),
      );
    }

    const messageId = envelope.messageId;
    const existing = this.#pending.get(messageId);
    if (existing !== undefined) {
      return existing.promise;
    }
    if (this.#pending.size >= this.#options.maxPendingSends) {
      return Promise.reject(
        new WsgwError(
          "TOO_MANY_PENDING",
          `${this.#pending.size} sends already wait for the gateway's confirm (maxPendingSends)`,
          messageId,
        ),
      );
    }

    const bytes = new TextEncoder().encode(text).length;
    if (bytes > this.#options.maxMessageBytes) {
      return Promise.reject(
        new WsgwError(
          "MESSAGE_TOO_BIG",
          `the send frame has ${bytes} bytes, more than maxMessageBytes (${this.#options.maxMessageBytes}); ` +
            "the gateway would close the connection with 1009",
          messageId,
        ),
      );
    }

    const entry = { text, attempts: 0, sentOn: 0, retryTimer: null };
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    this.#pending.set(messageId, entry);
    this.#pumpSends();
    return entry.promise;
  }

  /** Acks a message; needed only with autoAck: false. A message acked here is dropped if it comes again. */
  ack(messageId) {
    this.#remember(messageId, "acked");
    this.#sendFrame(messageId, { type: "ack", messageId });
  }

  /** Rejects a message, so the gateway pushes it again later. Needed only with autoAck: false. */
  reject(messageId, reason = "") {
    this.#seen.delete(messageId);
    this.#sendFrame(messageId, { type: "reject", messageId, reason: String(reason).slice(0, 1_000) });
  }

  // --- connecting ------------------------------------------------------------------------------------------

  async #connect() {
    this.#generation += 1;
    const generation = this.#generation;
    this.#setState("connecting");

    let url;
    try {
      url = await withTimeout(this.#connectionUrl(), this.#options.connectTimeoutMs, "requesting a connection URL");
    } catch (error) {
      if (generation !== this.#generation) {
        return;
      }
      this.#emit("error", new WsgwError("CONNECT_FAILED", error.message, null, { cause: error }));
      this.#scheduleReconnect(`no connection URL: ${error.message}`);
      return;
    }
    if (generation !== this.#generation) {
      return;
    }

    let socket;
    try {
      socket = new WebSocket(url, PROTOCOL);
    } catch (error) {
      this.#emit("error", new WsgwError("CONNECT_FAILED", `invalid connection URL: ${error.message}`));
      this.#scheduleReconnect(`invalid connection URL: ${error.message}`);
      return;
    }
    this.#socket = socket;
    this.#unacked.clear();
    socket.onmessage = (event) => {
      if (this.#socket === socket) {
        this.#onFrame(event.data);
      }
    };
    socket.onclose = (event) => {
      if (this.#socket === socket) {
        this.#onClose(event.code, event.reason, event.wasClean);
      }
    };
    // Every error event is followed by a close event, which decides what happens next.
    socket.onerror = () => {};
    this.#welcomeTimer = setTimeout(() => {
      if (this.#socket !== socket) {
        return;
      }
      // A close handshake with an unresponsive gateway can take minutes, so the socket is abandoned at once.
      detach(socket);
      socket.close();
      this.#onClose(CLOSE_ABNORMAL, `no welcome frame within ${this.#options.connectTimeoutMs} ms`, false);
    }, this.#options.connectTimeoutMs);
  }

  async #connectionUrl() {
    if (this.#options.getUrl) {
      const url = await this.#options.getUrl();
      if (typeof url !== "string" || url === "") {
        throw new Error(`getUrl() returned ${JSON.stringify(url)}, expected a ws:// or wss:// URL`);
      }
      return url;
    }
    const tokenUrl = String(this.#options.tokenUrl);
    const response = await fetch(tokenUrl, {
      cache: "no-store",
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    let body = null;
    try {
      body = await response.json();
    } catch {
      // Reported below with the HTTP status.
    }
    if (!response.ok || body === null || body.result !== 0 || typeof body.data !== "string") {
      const description =
        body !== null && typeof body.description === "string" ? body.description : "no JSON body";
      throw new Error(`the token endpoint ${tokenUrl} returned HTTP ${response.status}: ${description}`);
    }
    return body.data;
  }

  #onClose(code, reason, wasClean) {
    clearTimeout(this.#welcomeTimer);
    this.#welcomeTimer = null;
    const opened = this.#state === "open";
    const stable = opened && Date.now() - this.#openedAt >= this.#backoff.stableMs;
    this.#socket = null;
    this.#welcome = null;
    this.#unacked.clear();

    if (code === CLOSE_REPLACED) {
      this.#emit("close", closeInfo(code, reason, wasClean, false, opened));
      this.#halt("REPLACED", "a newer connection of the same identity replaced this one (close code 4001)");
      return;
    }
    if (code === CLOSE_KICKED) {
      this.#emit("close", closeInfo(code, reason, wasClean, true, opened));
      this.#failures = 0;
      this.#scheduleReconnect(`kicked: ${reason}`, Math.max(this.#backoff.kickedMs, this.#backoff.maxMs));
      return;
    }
    if (stable && !CLIENT_FAULT_CLOSES.has(code)) {
      this.#failures = 0;
    }
    this.#emit("close", closeInfo(code, reason, wasClean, true, opened));
    this.#scheduleReconnect(`closed with code ${code}${reason ? `: ${reason}` : ""}`);
  }

  // Waits `delayMs`, or a backoff delay with full jitter: a random time between 0 and
  // min(maxMs, initialMs * 2^failures).
  #scheduleReconnect(reason, delayMs = undefined) {
    let delay = delayMs;
    if (delay === undefined) {
      const ceiling = Math.min(this.#backoff.maxMs, this.#backoff.initialMs * 2 ** Math.min(this.#failures, 30));
      delay = Math.round(Math.random() * ceiling);
      this.#failures += 1;
    }
    this.#setState("waiting");
    this.#emit("reconnecting", { attempt: Math.max(this.#failures, 1), delayMs: delay, reason });
    const generation = this.#generation;
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      if (generation === this.#generation) {
        this.#connect();
      }
    }, delay);
  }

  // Ends the client: no reconnect, and every pending send is rejected with `code`.
  #halt(code, reason) {
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#welcomeTimer);
    this.#reconnectTimer = null;
    this.#welcomeTimer = null;
    this.#setState("stopped");
    for (const [messageId, entry] of this.#pending) {
      clearTimeout(entry.retryTimer);
      entry.reject(new WsgwError(code, reason, messageId));
    }
    this.#pending.clear();
    // Queued messages were not acked, so the gateway pushes them again to the next connection.
    for (const { message } of this.#inbox) {
      this.#seen.delete(message.messageId);
    }
    this.#inbox = [];
  }

  #setState(state) {
    this.#state = state;
  }

  // --- frames from the gateway -----------------------------------------------------------------------------

  #onFrame(data) {
    if (typeof data !== "string") {
      this.#emit("error", new WsgwError("INVALID_SERVER_FRAME", "the gateway sent a binary frame"));
      return;
    }
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (error) {
      this.#emit("error", new WsgwError("INVALID_SERVER_FRAME", `the gateway sent invalid JSON: ${error.message}`));
      return;
    }
    switch (frame?.type) {
      case "welcome":
        this.#onWelcome(frame);
        break;
      case "message":
        this.#onMessage(frame);
        break;
      case "ack":
        this.#onSendAck(frame.messageId);
        break;
      case "error":
        this.#onErrorFrame(frame);
        break;
      default:
        // A newer gateway may add frame types; this client ignores them.
        break;
    }
  }

  #onWelcome(frame) {
    clearTimeout(this.#welcomeTimer);
    this.#welcomeTimer = null;
    this.#welcome = frame;
    this.#openedAt = Date.now();
    this.#setState("open");
    this.#emit("open", frame);
    this.#pumpSends();
  }

  #onMessage(frame) {
    const message = frame.message;
    if (message === null || typeof message !== "object" || typeof message.messageId !== "string") {
      this.#emit("error", new WsgwError("INVALID_SERVER_FRAME", "a message frame without an envelope or messageId"));
      return;
    }
    const messageId = message.messageId;
    const meta = {
      redelivered: frame.redelivered === true,
      replayCount: Number.isInteger(frame.replayCount) ? frame.replayCount : 0,
    };
    this.#unacked.add(messageId);
    trimOldest(this.#unacked, this.#options.dedupeCapacity);

    const status = this.#seen.get(messageId);
    if (status === "acked") {
      this.#sendFrame(messageId, { type: "ack", messageId });
      return;
    }
    if (status !== undefined) {
      // Still queued or being handled, or waiting for the application's ack: that ack reaches this connection.
      return;
    }
    if (this.#isStale(message)) {
      this.#remember(messageId, "acked");
      this.#sendFrame(messageId, { type: "ack", messageId });
      this.#emit("stale", message, meta);
      return;
    }
    if (this.#inbox.length >= this.#options.maxQueuedMessages) {
      // Not acked, so a mailbox message comes again on the next connection. A broadcast is lost.
      this.#emit(
        "error",
        new WsgwError(
          "QUEUE_FULL",
          `${this.#inbox.length} messages wait for the handler (maxQueuedMessages); dropped this one`,
          messageId,
        ),
      );
      return;
    }
    this.#remember(messageId, "queued");
    this.#inbox.push({ message, meta });
    this.#drain();
  }

  // True when `message` is of a replaceable messageType and older, by (timestamp, messageId), than the newest
  // message of that type already handed to the handler. Otherwise records it as the newest.
  #isStale(message) {
    if (!this.#replaceable.has(message.messageType)) {
      return false;
    }
    const key = [Number.isFinite(message.timestamp) ? message.timestamp : 0, message.messageId];
    const newest = this.#newest.get(message.messageType);
    if (newest !== undefined && compareOrderKeys(key, newest) < 0) {
      return true;
    }
    this.#newest.set(message.messageType, key);
    return false;
  }

  // Hands queued messages to the "message" listeners one at a time, in push order, and acks or rejects each.
  async #drain() {
    if (this.#draining) {
      return;
    }
    this.#draining = true;
    try {
      while (this.#inbox.length > 0) {
        const { message, meta } = this.#inbox.shift();
        const messageId = message.messageId;
        if (this.#seen.get(messageId) !== "queued") {
          continue;
        }
        this.#seen.set(messageId, "handling");
        try {
          for (const listener of [...(this.#listeners.get("message") ?? [])]) {
            await listener(message, meta);
          }
        } catch (error) {
          this.#seen.delete(messageId);
          const reason = error instanceof Error ? error.message : String(error);
          // A broadcast cannot be rejected: the gateway would reply with UNKNOWN_MESSAGE_ID.
          if (!isBroadcast(message)) {
            this.#sendFrame(messageId, { type: "reject", messageId, reason: reason.slice(0, 1_000) });
          }
          this.#emit(
            "error",
            new WsgwError("HANDLER_FAILED", `the message handler failed: ${reason}`, messageId, { cause: error }),
          );
          continue;
        }
        if (this.#options.autoAck) {
          this.ack(messageId);
        } else if (this.#seen.get(messageId) === "handling") {
          this.#seen.set(messageId, "handled");
        }
      }
    } finally {
      this.#draining = false;
    }
  }

  // Sends an ack or reject frame for a message pushed on the current connection. A message pushed on an earlier
  // connection is not waiting there any more: it comes again and is acked or handled then.
  #sendFrame(messageId, frame) {
    if (this.#state !== "open" || !this.#unacked.has(messageId)) {
      return;
    }
    this.#unacked.delete(messageId);
    this.#socket.send(JSON.stringify(frame));
  }

  #remember(messageId, status) {
    this.#seen.delete(messageId);
    this.#seen.set(messageId, status);
    trimOldest(this.#seen, this.#options.dedupeCapacity);
  }

  // --- the client's own sends ------------------------------------------------------------------------------

  #onSendAck(messageId) {
    const entry = this.#pending.get(messageId);
    if (entry === undefined) {
      return;
    }
    this.#pending.delete(messageId);
    clearTimeout(entry.retryTimer);
    entry.resolve({ messageId });
    this.#pumpSends();
  }

  #onErrorFrame(frame) {
    const code = typeof frame.code === "string" ? frame.code : "UNKNOWN";
    const reason = typeof frame.reason === "string" ? frame.reason : "";
    const messageId = typeof frame.messageId === "string" ? frame.messageId : null;
    const entry = messageId === null ? undefined : this.#pending.get(messageId);
    if (entry === undefined) {
      this.#emit("error", new WsgwError(code, reason, messageId));
      return;
    }
    entry.attempts += 1;
    if (RETRIED_SEND_ERRORS.has(code) && entry.attempts < this.#options.maxSendAttempts) {
      entry.sentOn = 0;
      entry.retryTimer = setTimeout(() => {
        entry.retryTimer = null;
        this.#pumpSends();
      }, this.#retryDelay(code, reason, entry.attempts));
      this.#pumpSends();
      return;
    }
    this.#pending.delete(messageId);
    entry.reject(new WsgwError(code, reason, messageId));
    this.#pumpSends();
  }

  // Returns the wait that a RATE_LIMITED reason names ("... in 120 ms"), else a backoff delay with full jitter.
  #retryDelay(code, reason, attempts) {
    const named = code === "RATE_LIMITED" ? /in (\d+) ms/.exec(reason) : null;
    if (named !== null) {
      return Number(named[1]) + Math.round(Math.random() * this.#backoff.initialMs);
    }
    const ceiling = Math.min(this.#backoff.maxMs, this.#backoff.initialMs * 2 ** Math.min(attempts - 1, 30));
    return Math.round(Math.random() * ceiling);
  }

  // Transmits pending sends in send() order, at most maxSendsInFlight unconfirmed on this connection, so the
  // gateway's session.max_sends_in_flight (default 16) is not exceeded. A send made on an earlier connection
  // goes again with the same messageId.
  #pumpSends() {
    if (this.#state !== "open") {
      return;
    }
    let inFlight = 0;
    for (const entry of this.#pending.values()) {
      if (entry.sentOn === this.#generation) {
        inFlight += 1;
      }
    }
    for (const entry of this.#pending.values()) {
      if (inFlight >= this.#options.maxSendsInFlight) {
        return;
      }
      if (entry.sentOn === this.#generation || entry.retryTimer !== null) {
        continue;
      }
      entry.sentOn = this.#generation;
      inFlight += 1;
      this.#socket.send(entry.text);
    }
  }

  // --- events ----------------------------------------------------------------------------------------------

  #emit(event, ...args) {
    const listeners = this.#listeners.get(event);
    if (event === "error" && (listeners === undefined || listeners.size === 0)) {
      console.warn("wsgw:", args[0]);
      return;
    }
    for (const listener of [...(listeners ?? [])]) {
      try {
        const result = listener(...args);
        if (result && typeof result.then === "function") {
          result.then(undefined, reportListenerError);
        }
      } catch (error) {
        reportListenerError(error);
      }
    }
  }
}

// Checks the fields for which the gateway would reply with INVALID_FRAME. That error carries no messageId, so
// the send would stay pending. Assigns a messageId when the caller gave none.
function prepareEnvelope(message) {
  if (message === null || typeof message !== "object" || Array.isArray(message)) {
    throw new WsgwError("INVALID_ENVELOPE", "send() takes an envelope object");
  }
  for (const field of Object.keys(message)) {
    if (!ENVELOPE_FIELDS.has(field)) {
      throw new WsgwError("INVALID_ENVELOPE", `unknown envelope field ${JSON.stringify(field)}`);
    }
  }
  if (!CLIENT_SEND_TYPES.has(message.sendType)) {
    throw new WsgwError(
      "INVALID_ENVELOPE",
      `sendType must be CLIENT_TO_SERVER or CLIENT_TO_CLIENT, got ${JSON.stringify(message.sendType)}`,
    );
  }
  for (const field of ["messageType", "businessType"]) {
    if (typeof message[field] !== "string" || message[field] === "") {
      throw new WsgwError("INVALID_ENVELOPE", `${field} is missing or not a string`);
    }
  }
  for (const field of OPTIONAL_TEXT_FIELDS) {
    if (message[field] !== undefined && message[field] !== null && typeof message[field] !== "string") {
      throw new WsgwError("INVALID_ENVELOPE", `${field} must be a string or null`);
    }
  }
  if (message.timestamp !== undefined && message.timestamp !== null && !Number.isSafeInteger(message.timestamp)) {
    throw new WsgwError("INVALID_ENVELOPE", "timestamp must be an integer (ms since the Unix epoch) or null");
  }
  for (const field of ["tags", "businesses"]) {
    const list = message[field];
    if (list !== undefined && !(Array.isArray(list) && list.every((entry) => typeof entry === "string"))) {
      throw new WsgwError("INVALID_ENVELOPE", `${field} must be an array of strings`);
    }
  }
  const messageId = message.messageId ?? newMessageId();
  if (typeof messageId !== "string" || !MESSAGE_ID_PATTERN.test(messageId)) {
    throw new WsgwError("INVALID_ENVELOPE", "messageId must be 1 to 128 visible ASCII characters (! to ~)");
  }
  return { ...message, messageId };
}

// crypto.randomUUID exists only in secure contexts (https, localhost); getRandomValues exists everywhere.
function newMessageId() {
  if (typeof globalThis.crypto?.randomUUID === "function") {
    return globalThis.crypto.randomUUID();
  }
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function compareOrderKeys([leftTime, leftId], [rightTime, rightId]) {
  if (leftTime !== rightTime) {
    return leftTime < rightTime ? -1 : 1;
  }
  if (leftId === rightId) {
    return 0;
  }
  return leftId < rightId ? -1 : 1;
}

// A broadcast is a SERVER_TO_CLIENT message without toUniqueId (docs/protocol.md, section 6).
function isBroadcast(message) {
  return message.sendType === "SERVER_TO_CLIENT" && (message.toUniqueId ?? null) === null;
}

function closeInfo(code, reason, wasClean, willReconnect, opened) {
  return {
    code,
    reason,
    wasClean,
    opened,
    replaced: code === CLOSE_REPLACED,
    kicked: code === CLOSE_KICKED,
    willReconnect,
  };
}

function detach(socket) {
  socket.onmessage = null;
  socket.onclose = null;
  socket.onerror = null;
}

// Drops the oldest entries of a Set or Map (insertion order) until it has at most `capacity`.
function trimOldest(collection, capacity) {
  for (const key of collection.keys()) {
    if (collection.size <= capacity) {
      return;
    }
    collection.delete(key);
  }
}

function withTimeout(promise, timeoutMs, operation) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${operation} timed out after ${timeoutMs} ms`)), timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function reportListenerError(error) {
  if (typeof globalThis.reportError === "function") {
    globalThis.reportError(error);
  } else {
    console.error(error);
  }
}
