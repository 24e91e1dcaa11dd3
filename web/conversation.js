// The message list: a model of the conversation built from protocol events, and its DOM.
// Each message owns its element; a streaming reply re-renders only its own body, at most once
// per animation frame however many deltas arrive, and of that body only its open block
// (render.js's MarkdownView). A render that took long is spaced out further.

import { MarkdownView, renderPlain, spokenText } from "./render.js";

// The pause before the next render is this many times the last one's cost (at most MAX_PAUSE_MS).
const RENDER_PAUSE_FACTOR = 3;
const MAX_PAUSE_MS = 500;

const DONE_NOTES = {
  cancelled: "Stopped",
  length: "The reply was cut off at the length limit.",
};

function el(tag, className, attrs = {}) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

export class Conversation {
  /**
   * @param {HTMLElement} list the role="log" element
   * @param {{onRetry: (text: string) => void}} hooks
   */
  constructor(list, { onRetry }) {
    this.list = list;
    this.onRetry = onRetry;
    this.messages = new Map(); // "user:ID" | "assistant:ID" -> message
    this.dirty = new Set();
    this.flushScheduled = false;
    this.renderCostMs = 0;
  }

  clear() {
    this.messages.clear();
    this.dirty.clear();
    this.list.replaceChildren();
  }

  get isEmpty() {
    return this.messages.size === 0;
  }

  /** The id of the reply still open (no `done` yet, even if it already failed), if any. */
  get streamingId() {
    for (const message of this.messages.values()) {
      if (message.role === "assistant" && message.open) return message.id;
    }
    return null;
  }

  /** Messages sent from this page and not yet accepted by the server. */
  get pendingIds() {
    const ids = [];
    for (const message of this.messages.values()) {
      if (message.role === "user" && message.state === "pending") ids.push(message.id);
    }
    return ids;
  }

  /** The text of the last message this page sent that the server did not take, if any. */
  unsentText() {
    let text = null;
    for (const message of this.messages.values()) {
      if (message.role === "user" && (message.state === "pending" || message.state === "error")) {
        text = message.text;
      }
    }
    return text;
  }

  userText(id) {
    return this.messages.get(`user:${id}`)?.text ?? null;
  }

  /** A finished reply as a screen reader should hear it, once (null if it did not finish). */
  spokenReply(id) {
    const reply = this.messages.get(`assistant:${id}`);
    if (!reply || reply.state !== "done") return null;
    const note = reply.note ? ` (${reply.note})` : "";
    return `Assistant: ${spokenText(reply.parts.body)}${note}`;
  }

  // Local changes.

  /** A message this page is sending: shown at once, confirmed by the server's `user` event. */
  addPending(id, text) {
    const message = this.#create("user", id, text, "pending");
    this.#render(message);
  }

  /** A message the server refused (a per-socket error naming it), or one lost with the socket. */
  failPending(id, text) {
    const message = this.messages.get(`user:${id}`);
    if (!message || message.state !== "pending") return false;
    message.state = "error";
    message.error = text;
    this.#render(message);
    return true;
  }

  // Conversation events (each already checked for order by the caller).

  user({ id, text }) {
    let message = this.messages.get(`user:${id}`);
    if (message) {
      message.state = "done";
      message.error = null;
      message.note = null;
    } else {
      message = this.#create("user", id, text, "done");
    }
    this.#render(message);
    const reply = this.#create("assistant", id, "", "streaming");
    this.#render(reply);
  }

  delta({ reply_to: id, text }) {
    const reply = this.#reply(id);
    reply.text += text;
    reply.note = null;
    this.#markDirty(reply);
  }

  replyError({ reply_to: id, message: text }) {
    const reply = this.#reply(id);
    reply.state = "error";
    reply.error = text || "The reply failed.";
    this.#render(reply);
  }

  done({ reply_to: id, reason }) {
    const reply = this.#reply(id);
    // The server takes the next message only after `done`, even when an `error` came first.
    reply.open = false;
    reply.reason = reason;
    if (reason === "interrupted") {
      reply.state = "error";
      reply.error = "The reply was interrupted by a server restart.";
    } else if (reason === "error") {
      reply.state = "error";
      reply.error ??= "The reply failed.";
    } else {
      reply.state = "done";
      reply.note = DONE_NOTES[reason] ?? null;
    }
    this.#render(reply);
  }

  /** `queued`: the reply waits for capacity on the server. */
  queued(position) {
    const id = this.streamingId;
    const [pending] = this.pendingIds;
    const waiting =
      id !== null
        ? this.messages.get(`assistant:${id}`)
        : pending !== undefined
          ? this.messages.get(`user:${pending}`)
          : null;
    if (!waiting || (waiting.role === "assistant" && waiting.text)) return;
    const ahead = Number.isInteger(position) && position > 0;
    waiting.note = ahead ? `Waiting… (position ${position})` : "Waiting…";
    this.#render(waiting);
  }

  // Internals.

  #reply(id) {
    // A resume from a trimmed log can start after the `user` event: make the reply anyway.
    return this.messages.get(`assistant:${id}`) ?? this.#create("assistant", id, "", "streaming");
  }

  #create(role, id, text, state) {
    const node = el("article", "msg", { "data-testid": "message", "data-role": role });
    node.dataset.id = id;
    const who = el("span", "visually-hidden");
    who.textContent = role === "user" ? "You:" : "Assistant:";
    const body = el("div", "msg-body", { "data-testid": "message-text" });
    const typing = el("div", "typing", { "data-testid": "typing", role: "img" });
    typing.setAttribute("aria-label", "The assistant is typing");
    typing.append(el("span"), el("span"), el("span"));
    const note = el("p", "msg-note", { "data-testid": "message-note" });
    const error = el("p", "msg-error", { "data-testid": "error-text" });
    const retry = el("button", "retry", { "data-testid": "retry", type: "button" });
    retry.textContent = "Retry";
    retry.addEventListener("click", () => {
      const source = role === "user" ? message.text : this.userText(id);
      if (source !== null) this.onRetry(source);
    });
    const footer = el("div", "msg-footer");
    footer.append(note, error, retry);
    node.append(who, body, typing, footer);
    const open = role === "assistant";
    const message = { role, id, text, state, open, reason: null, error: null, note: null };
    message.parts = { node, body, typing, note, error, retry };
    message.view = role === "assistant" ? new MarkdownView(body) : null;
    this.messages.set(`${role}:${id}`, message);
    const pinned = this.#nearBottom();
    this.list.append(node);
    if (pinned) this.#scrollToBottom();
    return message;
  }

  #markDirty(message) {
    this.dirty.add(message);
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    const flush = () => {
      if (!this.flushScheduled) return;
      this.flushScheduled = false;
      const started = performance.now();
      const pinned = this.#nearBottom();
      for (const dirty of this.dirty) this.#render(dirty, false);
      this.dirty.clear();
      if (pinned) this.#scrollToBottom();
      this.renderCostMs = performance.now() - started;
    };
    const pause = Math.min(this.renderCostMs * RENDER_PAUSE_FACTOR, MAX_PAUSE_MS);
    if (pause < 10) requestAnimationFrame(flush);
    else setTimeout(() => requestAnimationFrame(flush), pause);
    setTimeout(flush, 100 + pause); // hidden tabs get no animation frames
  }

  #render(message, keepPinned = true) {
    this.dirty.delete(message);
    const pinned = keepPinned && this.#nearBottom();
    const { node, body, typing, note, error, retry } = message.parts;
    node.dataset.state = message.state;
    if (message.reason) node.dataset.reason = message.reason;
    else delete node.dataset.reason;
    node.setAttribute("aria-busy", String(message.state === "streaming"));
    if (message.view) message.view.update(message.text, !message.open);
    else if (body.textContent !== message.text) body.replaceChildren(renderPlain(message.text));
    body.hidden = message.text === "";
    typing.hidden = !(message.state === "streaming" && message.text === "");
    note.textContent = message.note ?? (message.state === "pending" ? "Sending…" : "");
    note.hidden = note.textContent === "";
    error.textContent = message.error ?? "";
    error.hidden = message.state !== "error";
    error.setAttribute("role", message.state === "error" ? "alert" : "none");
    retry.hidden = message.state !== "error";
    if (pinned) this.#scrollToBottom();
  }

  #nearBottom() {
    const { scrollTop, scrollHeight, clientHeight } = this.list;
    return scrollHeight - scrollTop - clientHeight < 80;
  }

  #scrollToBottom() {
    this.list.scrollTop = this.list.scrollHeight;
  }
}
