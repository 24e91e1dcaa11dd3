// The chat page: wires the connection, the conversation view, the composer and the session store.
// Protocol: docs/protocol.md. Every conversation event carries a seq; the page remembers the last
// one it applied and resumes from there after a drop, so a reply continues with nothing lost or
// repeated.

import { Connection } from "./connection.js";
import { Conversation } from "./conversation.js";
import { copyCode } from "./render.js";
import { accessToken, forgetSession, loadSession, saveSession } from "./storage.js";

const $ = (id) => document.getElementById(id);
const ui = {
  list: $("messages"),
  empty: $("empty"),
  form: $("composer-form"),
  composer: $("composer"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  status: $("status"),
  model: $("model"),
  demo: $("demo-label"),
  notice: $("notice"),
  announcer: $("announcer"),
};

const STATUS_TEXT = {
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  offline: "Offline",
};

// Delivery of `stop` is at-most-once: with no `done` by then, Stop can be pressed again.
const STOP_RETRY_MS = 5_000;

const saved = loadSession();
const state = {
  // The session this page shows; null until the server names one.
  session: saved?.id ?? null,
  // The last seq applied. A reload rebuilds from the whole log (after=0), so it starts at 0.
  lastSeq: 0,
  // The epoch lastSeq counts in (from `ready` or `resync`): a new one means the server lost data.
  epoch: null,
  // Events up to the current socket's `ready.seq` are a replay: shown, but not announced again.
  liveAfter: 0,
  stopping: null, // the timer that re-arms Stop if no `done` comes
};
let persistTimer = null;

const conversation = new Conversation(ui.list, {
  onRetry: (text) => {
    sendMessage(text);
    ui.composer.focus(); // the Retry button disables itself: keep the keyboard somewhere useful
  },
});

const connection = new Connection({
  url: socketUrl,
  protocols: socketProtocols,
  onFrame: handleFrame,
  onDrop: handleDrop,
  onStatus: (status) => {
    ui.status.dataset.status = status;
    ui.status.textContent = STATUS_TEXT[status];
    updateControls();
  },
});

const token = accessToken();

// The session id and the access token are credentials: they travel as subprotocols (the
// Sec-WebSocket-Protocol header), not in the URL that balancers and routers log.
function socketUrl() {
  const url = new URL("/ws", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (state.session) {
    url.searchParams.set("after", String(state.lastSeq));
    if (state.epoch) url.searchParams.set("epoch", state.epoch);
  }
  return url.href;
}

function socketProtocols() {
  const protocols = ["chatbot.v1"];
  if (state.session) protocols.push(`chatbot.session.${state.session}`);
  if (token) protocols.push(`chatbot.token.${base64url(token)}`);
  return protocols;
}

function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  const binary = Array.from(bytes, (byte) => String.fromCharCode(byte)).join("");
  return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

// Frames.

function handleFrame(frame) {
  switch (frame.type) {
    case "ready":
      handleReady(frame);
      break;
    case "user":
      if (accept(frame)) conversation.user(frame);
      break;
    case "delta":
      if (accept(frame)) conversation.delta(frame);
      break;
    case "done":
      // Without a seq: the reply ended `interrupted` with data the server lost (then `resync`).
      if (frame.seq === undefined || accept(frame)) {
        conversation.done(frame);
        setStopping(false);
        if (frame.seq > state.liveAfter) announce(conversation.spokenReply(frame.reply_to));
      }
      break;
    case "error":
      if (frame.seq === undefined) socketError(frame);
      else if (accept(frame)) conversation.replyError(frame);
      break;
    case "resync":
      startOver(frame.epoch);
      break;
    case "queued":
      conversation.queued(frame.position);
      break;
    default:
      console.warn("ignoring an unknown frame", frame);
  }
  updateControls();
}

function handleReady(frame) {
  state.liveAfter = frame.seq;
  if (frame.session !== state.session) {
    // A new session: the first visit, "New chat", or the old session expired on the server.
    // This socket replays nothing, so the next event is `ready.seq + 1`.
    const expired = state.session !== null;
    const unsent = expired ? conversation.unsentText() : null;
    conversation.clear();
    setStopping(false);
    state.lastSeq = frame.seq;
    showNotice(expired ? "The previous conversation has expired; this is a new one." : "");
    if (unsent && !ui.composer.value.trim()) {
      ui.composer.value = unsent; // not lost with the old session: send it again here
      autosize();
    }
  } else if (state.epoch !== null && frame.epoch !== state.epoch) {
    startOver(frame.epoch); // the server replays its whole log: we sent our epoch
  } else if (frame.seq < state.lastSeq) {
    state.lastSeq = frame.seq; // the server's log is the truth
  }
  state.epoch = frame.epoch ?? null;
  state.session = frame.session;
  persist(true);
  ui.model.textContent = frame.model;
  ui.model.hidden = !frame.model;
  ui.demo.hidden = !frame.demo;
}

/** The server lost data (a new epoch): drop the view; the whole log it kept follows. */
function startOver(epoch) {
  conversation.clear();
  setStopping(false);
  state.lastSeq = 0;
  state.epoch = epoch;
  showNotice("The server lost part of this conversation; this is what it kept.");
}

/** Apply each conversation event once, in order: a resume must not repeat anything. */
function accept(frame) {
  if (!Number.isInteger(frame.seq) || frame.seq <= state.lastSeq) return false;
  if (frame.seq !== state.lastSeq + 1) {
    console.warn(`events ${state.lastSeq + 1}-${frame.seq - 1} are missing (log trimmed?)`);
  }
  state.lastSeq = frame.seq;
  persist(false);
  return true;
}

/** Save the session; a streaming reply writes at most a few times a second. */
function persist(now) {
  if (now) {
    clearTimeout(persistTimer);
    persistTimer = null;
    saveSession(state.session, state.lastSeq);
  } else {
    persistTimer ??= setTimeout(() => persist(true), 250);
  }
}

/** A problem with this socket or a message it sent (no seq): shown to this page only. */
function socketError({ code, message, id }) {
  const text = message || `The server refused the request (${code}).`;
  const pending = conversation.pendingIds;
  if (id !== undefined && conversation.failPending(id, text)) return;
  // Protocol: `id` names the message an error is about. If it is missing but exactly one
  // message is waiting for its echo, that is the one (this page sends one at a time).
  if (id === undefined && code !== "invalid_json" && pending.length === 1) {
    conversation.failPending(pending[0], text);
    return;
  }
  setStopping(false); // e.g. `unavailable` for a stop: it may be sent again
  showNotice(text);
}

function handleDrop() {
  // A message sent but not echoed may or may not have been accepted. Mark it failed; if the
  // resume replays its `user` event, the message is confirmed after all.
  for (const id of conversation.pendingIds) {
    conversation.failPending(id, "Not sent: the connection dropped.");
  }
  setStopping(false);
  updateControls();
}

// Actions.

function sendMessage(text) {
  if (!text.trim() || !canSend()) return false;
  const id = crypto.randomUUID();
  if (!connection.send({ type: "message", id, text })) return false;
  showNotice("");
  conversation.addPending(id, text);
  updateControls();
  return true;
}

function canSend() {
  return (
    connection.ready && conversation.streamingId === null && conversation.pendingIds.length === 0
  );
}

function stopReply() {
  if (conversation.streamingId === null || state.stopping !== null) return;
  if (connection.send({ type: "stop" })) setStopping(true);
}

/** While a stop is on its way Stop is disabled; without a `done` soon it may be sent again. */
function setStopping(on) {
  clearTimeout(state.stopping);
  state.stopping = on ? setTimeout(() => setStopping(false), STOP_RETRY_MS) : null;
  updateControls();
}

function newChat() {
  state.session = null;
  state.lastSeq = 0;
  state.epoch = null;
  setStopping(false);
  clearTimeout(persistTimer);
  persistTimer = null;
  forgetSession();
  conversation.clear();
  showNotice("");
  updateControls();
  connection.restart();
  ui.composer.focus();
}

/** Screen readers hear each finished reply once (the message list itself is not live). */
function announce(text) {
  if (text) ui.announcer.textContent = text;
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

function updateControls() {
  const streaming = conversation.streamingId !== null;
  ui.send.disabled = !canSend() || !ui.composer.value.trim();
  ui.send.hidden = streaming;
  ui.stop.hidden = !streaming;
  ui.stop.disabled = state.stopping !== null || !connection.ready;
  ui.stop.textContent = state.stopping !== null ? "Stopping…" : "Stop";
  ui.empty.hidden = !conversation.isEmpty;
  const busy = streaming || conversation.pendingIds.length > 0;
  ui.composer.setAttribute("aria-describedby", busy ? "composer-busy" : "composer-hint");
  for (const button of ui.list.querySelectorAll("[data-testid=retry]")) {
    button.disabled = !canSend();
  }
}

// Wiring.

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (sendMessage(ui.composer.value)) {
    ui.composer.value = "";
    autosize();
  }
  updateControls();
});

ui.composer.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  } else if (event.key === "Escape" && conversation.streamingId !== null) {
    event.preventDefault();
    stopReply();
  }
});

function autosize() {
  ui.composer.style.height = "auto";
  ui.composer.style.height = `${Math.min(ui.composer.scrollHeight, 200)}px`;
}

ui.composer.addEventListener("input", () => {
  autosize();
  updateControls();
});

ui.stop.addEventListener("click", () => {
  stopReply();
  ui.composer.focus(); // Stop disappears with the reply
});
ui.newChat.addEventListener("click", newChat);

ui.list.addEventListener("click", (event) => {
  const copy = event.target.closest?.("[data-testid=copy]");
  if (copy) copyCode(copy);
});

window.addEventListener("pagehide", () => {
  if (state.session) persist(true);
});

connection.start();
updateControls();
