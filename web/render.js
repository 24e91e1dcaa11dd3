// A small, safe renderer for model output: paragraphs, line breaks, inline code and fenced code
// blocks, built only from DOM nodes and textContent. Model output is untrusted: nothing here
// parses HTML, sets innerHTML, creates links or touches attributes with text from the message,
// so `<script>`, `<img onerror>` and `javascript:` links stay plain text.

const FENCE_OPEN = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const INLINE_CODE = /`([^`\n]+)`/g;

/**
 * Split text into blocks: `{kind: "p", text}` and `{kind: "code", lang, text, closed}`.
 * A fence still open at the end (a reply mid-stream) is a code block that runs to the end.
 */
export function parseBlocks(text) {
  const blocks = [];
  const lines = text.split("\n");
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) blocks.push({ kind: "p", text: paragraph.join("\n") });
    paragraph = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const open = FENCE_OPEN.exec(lines[i]);
    if (open) {
      flush();
      const marker = open[1];
      const close = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}\\s*$`);
      const code = [];
      let closed = false;
      for (i += 1; i < lines.length; i++) {
        if (close.test(lines[i])) {
          closed = true;
          break;
        }
        code.push(lines[i]);
      }
      blocks.push({ kind: "code", lang: open[2], text: code.join("\n"), closed });
    } else if (lines[i].trim() === "") {
      flush();
    } else {
      paragraph.push(lines[i]);
    }
  }
  flush();
  return blocks;
}

function appendInline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE_CODE)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    const code = document.createElement("code");
    code.className = "inline-code";
    code.textContent = match[1];
    parent.append(code);
    last = match.index + match[0].length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function codeBlock(block) {
  const wrap = document.createElement("div");
  wrap.className = "code-block";
  const head = document.createElement("div");
  head.className = "code-head";
  const lang = document.createElement("span");
  lang.className = "code-lang";
  lang.textContent = block.lang || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.dataset.testid = "copy";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", "Copy code to the clipboard");
  head.append(lang, copy);
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  code.textContent = block.text;
  pre.append(code);
  wrap.append(head, pre);
  return wrap;
}

/** Render `text` into a DocumentFragment of safe DOM nodes. */
export function renderRich(text) {
  const fragment = document.createDocumentFragment();
  for (const block of parseBlocks(text)) {
    if (block.kind === "code") {
      fragment.append(codeBlock(block));
    } else {
      // Line breaks inside a paragraph are kept as "\n" and shown by `white-space: pre-wrap`,
      // so the paragraph's text is exactly the model's text.
      const p = document.createElement("p");
      appendInline(p, block.text);
      fragment.append(p);
    }
  }
  return fragment;
}

/** Render user text: exactly as typed, no formatting at all. */
export function renderPlain(text) {
  const p = document.createElement("p");
  p.textContent = text;
  return p;
}

/** Copy a code block's text; the button says whether it worked. */
export async function copyCode(button) {
  const code = button.closest(".code-block")?.querySelector("pre > code");
  if (!code) return;
  let ok = false;
  try {
    await navigator.clipboard.writeText(code.textContent);
    ok = true;
  } catch {
    // No async clipboard (plain-http origins, old browsers): select the code and copy that.
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    ok = document.execCommand("copy");
    selection.removeAllRanges();
  }
  button.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}
