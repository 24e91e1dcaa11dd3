// One WebSocket to /ws that comes back when it drops: jittered exponential backoff, a connect
// timeout, and a fresh URL (resume point) and subprotocols (credentials) for every attempt.

export const CloseCode = Object.freeze({
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
});

const BASE_DELAY_MS = 250;
const MAX_DELAY_MS = 10_000;
const TRY_AGAIN_LATER_MS = 3_000;
const CONNECT_TIMEOUT_MS = 10_000;
// After this many failed attempts in a row the status says "offline" (it still keeps trying).
const OFFLINE_AFTER_ATTEMPTS = 5;
// Heartbeat: the server closes a socket silent for WS_IDLE_TIMEOUT_S (90 s by default), and a
// socket that has heard nothing (not even a pong) for SILENCE_MS is taken for dead here.
const PING_EVERY_MS = 25_000;
const SILENCE_MS = 60_000;

/**
 * Status: "connecting" (first attempt), "connected" (the server said `ready`), "reconnecting",
 * "offline" (the browser is offline, or the server has been unreachable for a while).
 */
export class Connection {
  /**
   * @param {{
   *   url: () => string,
   *   protocols: () => string[],
   *   onFrame: (frame: object) => void,
   *   onDrop: (event: CloseEvent) => void,
   *   onStatus: (status: string) => void,
   * }} hooks
   */
  constructor({ url, protocols, onFrame, onDrop, onStatus }) {
    this.url = url;
    this.protocols = protocols;
    this.onFrame = onFrame;
    this.onDrop = onDrop;
    this.onStatus = onStatus;
    this.ws = null;
    this.ready = false;
    this.attempt = 0;
    this.retryTimer = null;
    this.status = null;
    this.running = false;
    window.addEventListener("online", () => this.#onOnline());
    window.addEventListener("offline", () => {
      if (!this.ready) this.#setStatus("offline");
    });
  }

  start() {
    this.running = true;
    this.attempt = 0;
    this.#open(false);
  }

  /** Drop the current socket (if any) and connect again now, e.g. for a new session. */
  restart() {
    this.#discard();
    this.running = true;
    this.attempt = 0;
    this.#open(false);
  }

  /** Send a frame if the socket is open and ready; false otherwise. */
  send(frame) {
    if (!this.ready || this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  #open(again) {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.ready = false;
    this.#setStatus(again ? this.#troubleStatus() : "connecting");
    const ws = new WebSocket(this.url(), this.protocols());
    this.ws = ws;
    // A handshake that never completes (a dead route, a stalled proxy) would wait forever.
    const connectTimer = setTimeout(() => ws.close(), CONNECT_TIMEOUT_MS);
    let heardAt = Date.now();
    const heartbeat = setInterval(() => {
      if (Date.now() - heardAt > SILENCE_MS) ws.close();
      else if (ws.readyState === WebSocket.OPEN) ws.send('{"type":"ping"}');
    }, PING_EVERY_MS);
    ws.addEventListener("message", (event) => {
      if (ws !== this.ws) return;
      heardAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        console.warn("ignoring a frame that is not JSON", event.data);
        return;
      }
      if (frame?.type === "pong") return;
      if (frame?.type === "ready") {
        clearTimeout(connectTimer);
        this.ready = true;
        this.attempt = 0;
        this.#setStatus("connected");
      }
      this.onFrame(frame);
    });
    ws.addEventListener("close", (event) => {
      clearTimeout(connectTimer);
      clearInterval(heartbeat);
      if (ws !== this.ws) return; // discarded on purpose
      this.ws = null;
      this.ready = false;
      this.onDrop(event);
      if (this.running) this.#retry(event.code);
    });
  }

  #retry(code) {
    let delay;
    if (code === CloseCode.SERVICE_RESTART) {
      // This server is going away; another instance can take us at once.
      delay = 100 + Math.random() * 400;
    } else {
      const ceiling = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** this.attempt);
      delay = ceiling / 2 + (Math.random() * ceiling) / 2;
      if (code === CloseCode.TRY_AGAIN_LATER) delay = Math.max(delay, TRY_AGAIN_LATER_MS);
    }
    this.attempt += 1;
    this.#setStatus(this.#troubleStatus());
    this.retryTimer = setTimeout(() => this.#open(true), delay);
  }

  #troubleStatus() {
    return !navigator.onLine || this.attempt >= OFFLINE_AFTER_ATTEMPTS ? "offline" : "reconnecting";
  }

  #onOnline() {
    if (this.running && this.retryTimer !== null) {
      this.attempt = 0;
      this.#open(true);
    }
  }

  #discard() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const ws = this.ws;
    this.ws = null;
    this.ready = false;
    if (ws) ws.close(1000, "new chat");
  }

  #setStatus(status) {
    if (status === this.status) return;
    this.status = status;
    this.onStatus(status);
  }
}
