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
