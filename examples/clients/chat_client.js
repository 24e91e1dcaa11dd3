// A /ws chat client to paste into your page (or run in Node 22+, which has WebSocket).
//
//   const chat = openChat({ onDelta: (text) => out.append(text), onDone: (reason) => ... });
//   chat.send("Hello");
//
// It pings every 25 s (the server closes a socket silent for WS_IDLE_TIMEOUT_S), and when the
// connection drops or the server restarts (close code 1012) it reconnects with `session` and
// `after` and picks up where it was: nothing lost, nothing twice; a message is sent again only
// if the server never logged it. tests/browser/test_client_snippets.py runs this file in Chromium
// against a real server. Protocol: docs/protocol.md.

export function openChat({
  url = new URL("/ws", location.href).href.replace(/^http/, "ws"),
  session = null, // an earlier session id, to continue that conversation
  token = null, // ACCESS_TOKEN, when the server has one
  onDelta = (text, replyTo) => {},
  onDone = (reason, replyTo) => {},
  onError = (code, message, id) => {},
  onStatus = (status, detail) => {},
} = {}) {
  const PING_EVERY_MS = 25000;
  let ws = null;
  let lastSeq = null; // the last conversation event seen
  let replayEnd = null; // events up to here were logged before this socket opened
  let retryMs = 500;
  let pinger = null;
  let closed = false;
  const unsent = new Map(); // id -> text, until the server's `user` event confirms it

  function connect() {
    const address = new URL(url);
    if (session) address.searchParams.set("session", session);
    if (session && lastSeq !== null) address.searchParams.set("after", String(lastSeq));
    if (token) address.searchParams.set("token", token);
    ws = new WebSocket(address);
    ws.onopen = () => {
      pinger = setInterval(() => ws.send('{"type":"ping"}'), PING_EVERY_MS);
    };
    ws.onmessage = (event) => handle(JSON.parse(event.data));
    ws.onclose = (event) => {
      clearInterval(pinger);
      if (closed) return;
      onStatus("reconnecting", event.code); // 1012: the server restarts; 1006: a drop
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 10000);
    };
  }

  function handle(frame) {
    if (frame.type === "ready") {
      if (frame.session !== session) {
        session = frame.session; // new (or expired): nothing there to resume
        lastSeq = frame.seq;
      } else if (lastSeq === null) {
        lastSeq = frame.seq;
      }
      replayEnd = frame.seq;
      retryMs = 500;
      onStatus("open", session);
      if (lastSeq >= replayEnd) resend();
      return;
    }
    if (frame.seq !== undefined) {
      if (frame.seq <= lastSeq) return; // seen before the reconnect
      lastSeq = frame.seq;
    }
    if (frame.type === "user") unsent.delete(frame.id);
    else if (frame.type === "delta") onDelta(frame.text, frame.reply_to);
    else if (frame.type === "done") onDone(frame.reason, frame.reply_to);
    else if (frame.type === "error") {
      if (frame.seq === undefined) unsent.delete(frame.id); // refused: sending again won't help
      onError(frame.code, frame.message, frame.reply_to ?? frame.id);
    }
    if (frame.seq === replayEnd) resend(); // the replay is over: what it lacked was never logged
  }

  function resend() {
    for (const [id, text] of unsent) ws.send(JSON.stringify({ type: "message", id, text }));
  }

  connect();
  return {
    send(text) {
      const id = crypto.randomUUID();
      unsent.set(id, text);
      if (ws.readyState === WebSocket.OPEN && lastSeq !== null) {
        ws.send(JSON.stringify({ type: "message", id, text }));
      }
      return id;
    },
    stop() {
      ws.send('{"type":"stop"}');
    },
    close() {
      closed = true;
      ws.close();
    },
    get session() {
      return session;
    },
  };
}
