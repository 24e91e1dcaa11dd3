// The session this browser continues after a reload: its id and the last event seq seen.
// localStorage may be unavailable (privacy modes, storage quotas): then nothing survives a reload.

const KEY = "chatbot.session";

export function loadSession() {
  try {
    const saved = JSON.parse(localStorage.getItem(KEY) ?? "null");
    if (typeof saved?.id === "string" && Number.isInteger(saved.lastSeq)) return saved;
  } catch {
    // unreadable: start fresh
  }
  return null;
}

export function saveSession(id, lastSeq) {
  try {
    localStorage.setItem(KEY, JSON.stringify({ id, lastSeq }));
  } catch {
    // not persisted; the conversation still works in this page
  }
}

export function forgetSession() {
  try {
    localStorage.removeItem(KEY);
  } catch {
    // nothing to forget
  }
}

// The deployment's ACCESS_TOKEN, when it has one: given once as #token=... in the page's URL,
// then kept here (and removed from the address bar, so it is not shared with a screenshot).
const TOKEN_KEY = "chatbot.token";

export function accessToken() {
  const fromUrl = new URLSearchParams(window.location.hash.slice(1)).get("token");
  try {
    if (fromUrl) {
      localStorage.setItem(TOKEN_KEY, fromUrl);
      history.replaceState(null, "", window.location.pathname + window.location.search);
    }
    return fromUrl ?? localStorage.getItem(TOKEN_KEY);
  } catch {
    return fromUrl;
  }
}
