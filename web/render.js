// Model output as Markdown: CommonMark with GitHub's tables, task lists, strikethrough and
// autolinks, parsed by marked and sanitized by DOMPurify (both vendored in web/vendor, pinned by
// tools/vendor.py). Model output is untrusted, so the renderer is hardened before the sanitizer
// sees anything: raw HTML is shown as text, a link or image keeps its URL only if it is
// http(s) or mailto (otherwise its Markdown source is shown as text), images are never loaded
// (they become links), and every link opens in a new tab without an opener or a referrer.
// DOMPurify then keeps only the tags and attributes this renderer writes. The page's CSP
// (index.html) is the last line: only our own scripts run, no inline style applies, and Trusted
// Types let nothing but DOMPurify turn a string into HTML.
//
// A streaming reply is rendered by a MarkdownView, which parses only the part of the reply whose
// blocks may still change: blocks followed by another block are final (CommonMark decides block
// boundaries line by line), so they are rendered once and kept; each update re-renders only the
// last, open block, and changes only the DOM nodes that differ. What is still half-written is held
// back until it is complete: a line that may become a code fence, a table row or a list item, a
// table's header before its delimiter row, and an emphasis, code span or link opened on the last
// line, so a reply mid-stream shows no stray backticks, pipes or asterisks.

import { Lexer, Parser, Renderer } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.mjs";

const OPTIONS = { gfm: true, breaks: false, async: false };
const SAFE_URL = /^(?:https?:\/\/|mailto:)/i;
// A last line, not yet ended by a newline, that may be the start of a fenced code block, a table
// row, or a list item (which would continue the list before it, not start a block after it).
const PARTIAL_LINE = /^ {0,3}(?:\||`{1,2}$|~{1,2}$|`{3,}[^`]*$|~{3,}|\d{1,9}[.)]?$|[-+*]$)/;
const TABLE_LINE = /^ {0,3}\|/;

/** Work done so far (for the browser tests and bench/render.py): renders and characters parsed. */
export const renderStats = { renders: 0, parsedChars: 0, longestParse: 0, longestMs: 0 };

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escape = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

function safeUrl(href) {
  if (typeof href !== "string" || !SAFE_URL.test(href)) return null;
  try {
    const url = new URL(href);
    return ["http:", "https:", "mailto:"].includes(url.protocol) ? href : null;
  } catch {
    return null;
  }
}

function anchor(href, title, inner, className = "") {
  const extra = `${title ? ` title="${escape(title)}"` : ""}${className ? ` class="${className}"` : ""}`;
  return `<a href="${escape(href)}" target="_blank" rel="noopener noreferrer"${extra}>${inner}</a>`;
}

class SafeRenderer extends Renderer {
  html({ text, block }) {
    // Shown as the model wrote it; block HTML keeps its line breaks.
    return block ? `<p class="raw">${escape(text.replace(/\n+$/, ""))}</p>` : escape(text);
  }

  link({ href, title, tokens, raw }) {
    const url = safeUrl(href);
    return url ? anchor(url, title, this.parser.parseInline(tokens)) : escape(raw);
  }

  image({ href, title, text, raw }) {
    const url = safeUrl(href);
    return url ? anchor(url, title, `Image: ${escape(text || url)}`, "image-link") : escape(raw);
  }

  code({ text, lang }) {
    const label = (lang || "").match(/^\S*/)[0] || "code";
    return (
      `<div class="code-block"><div class="code-head"><span class="code-lang">${escape(label)}</span>` +
      `<button type="button" class="copy" aria-label="Copy ${escape(label)} code">Copy</button></div>` +
      `<pre tabindex="0"><code>${escape(text)}</code></pre></div>`
    );
  }

  codespan(token) {
    return `<code class="inline-code">${super.codespan(token).slice("<code>".length)}`;
  }

  checkbox({ checked }) {
    return `<input type="checkbox" disabled${checked ? " checked" : ""} aria-label="${checked ? "Done" : "Not done"}"> `;
  }

  table(token) {
    // Wide tables scroll inside the message (a phone screen), and a scroller must be focusable.
    return `<div class="table-wrap" tabindex="0" role="region" aria-label="Table">${super.table(token)}</div>`;
  }
}

const renderer = new SafeRenderer(OPTIONS);
const parserOptions = { ...OPTIONS, renderer };

const PURIFY = {
  ALLOWED_TAGS: [
    "a", "blockquote", "br", "button", "code", "del", "div", "em", "h1", "h2", "h3", "h4", "h5",
    "h6", "hr", "input", "li", "ol", "p", "pre", "span", "strong", "table", "tbody", "td", "th",
    "thead", "tr", "ul",
  ],
  ALLOWED_ATTR: [
    "align", "aria-label", "checked", "class", "disabled", "href", "rel", "role",
    "start", "tabindex", "target", "title", "type",
  ],
  ALLOW_DATA_ATTR: false,
  // DOMPurify checks every attribute's value against ALLOWED_URI_REGEXP unless it is listed
  // here; these never hold a URL.
  ADD_URI_SAFE_ATTR: ["align", "rel", "start", "tabindex", "target", "type"],
  ALLOWED_URI_REGEXP: SAFE_URL,
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    if (safeUrl(node.getAttribute("href")) === null) node.removeAttribute("href");
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  } else if (node.tagName === "INPUT") {
    node.setAttribute("type", "checkbox");
    node.setAttribute("disabled", "");
  } else if (node.tagName === "BUTTON") {
    node.dataset.testid = "copy"; // data-* attributes are not let through
  }
});

const plainBlock = (text) => ({ type: "html", block: true, raw: text, text });

/** Markdown tokens to sanitized DOM nodes. */
function toNodes(tokens) {
  if (tokens.length === 0) return [];
  let html;
  try {
    html = Parser.parse(tokens, parserOptions);
  } catch {
    html = Parser.parse([plainBlock(tokens.map((t) => t.raw).join(""))], parserOptions);
  }
  const nodes = DOMPurify.sanitize(html, PURIFY).childNodes;
  return [...nodes].filter((node) => node.nodeType !== Node.TEXT_NODE || node.data.trim());
}

/** While streaming: hold back a last line that could still become a fence or a table row. */
function settled(text) {
  const start = text.lastIndexOf("\n") + 1;
  return PARTIAL_LINE.test(text.slice(start)) ? text.slice(0, start) : text;
}

/**
 * While streaming: where to cut `text` (already lexed into `tokens`) so that nothing half-written
 * shows: pipe rows ending the last paragraph (a table whose delimiter row has not arrived), and an
 * inline marker (backtick, **, ~~, *, [, <) opened on the last line and not yet closed.
 */
function heldBack(text, tokens) {
  const last = tokens.findLastIndex((t) => t.type !== "space");
  if (last < 0 || !["paragraph", "heading", "list", "blockquote"].includes(tokens[last].type)) {
    return text.length;
  }
  let end = 0;
  for (let i = 0; i <= last; i++) end += tokens[i].raw.length;
  let cut = text.length;
  if (tokens[last].type === "paragraph") {
    const raw = tokens[last].raw.replace(/\n$/, "");
    const lines = raw.split("\n");
    let start = end - tokens[last].raw.length + raw.length + 1; // past the paragraph's last line
    let held = 0;
    for (let i = lines.length - 1; i >= 0 && TABLE_LINE.test(lines[i]); i--, held++) {
      start -= lines[i].length + 1;
    }
    if (held) cut = start;
  }
  const lineStart = text.lastIndexOf("\n", cut - 1) + 1;
  const open = unclosedAt(text.slice(lineStart, cut));
  return open < 0 ? cut : lineStart + open;
}

const LIST_BULLET = /^[ \t]*(?:[-+*]|\d{1,9}[.)])[ \t]/;
// A marker opened further back than this is taken for a literal character ("a < b", "5 * 3"):
// holding it back would stall a long line until it ends.
const MAX_HELD_CHARS = 160;

/** Where the first marker left open near the end of `line` starts, or -1. */
function unclosedAt(line) {
  const body = line.replace(LIST_BULLET, (bullet) => " ".repeat(bullet.length));
  let at = -1;
  const hold = (index) => {
    if (index >= 0 && (at < 0 || index < at)) at = index;
  };
  const code = body.split("`").length - 1;
  if (code % 2) hold(body.lastIndexOf("`"));
  const outside = code % 2 ? body.slice(0, body.lastIndexOf("`")) : body;
  for (const mark of ["*", "~"]) {
    const double = mark + mark;
    if ((outside.split(double).length - 1) % 2) hold(outside.lastIndexOf(double));
    const single = outside.replaceAll(double, "  ");
    if ((single.split(mark).length - 1) % 2) hold(single.lastIndexOf(mark));
  }
  const bracket = outside.lastIndexOf("[");
  if (bracket >= 0 && /^\[[^\]]*(?:\]\([^)]*|\][ \t]*)?$/.test(outside.slice(bracket))) {
    hold(outside[bracket - 1] === "!" ? bracket - 1 : bracket);
  }
  const angle = outside.lastIndexOf("<");
  if (angle >= 0 && !outside.includes(">", angle)) hold(angle);
  return at >= 0 && line.length - at <= MAX_HELD_CHARS ? at : -1;
}

// Quotes and lists nested deeper than this on one line (only hostile text does that) would
// overflow marked's recursion: the marker that would open the next level is made plain text by
// a look-alike character of the same length, so offsets into the reply stay the same.
const MAX_NESTING = 16;
const LOOKALIKE = { ">": "\u203a", "-": "\u2010", "*": "\u2217", "+": "\uff0b", ".": "\u2024", ")": "\uff09" };
const NESTED_START = /^[ \t]*(?:[>*+-]|\d)/;

function capNesting(text) {
  if (!text.includes(">") && !/[-+*.)][ \t][ \t]*(?:[-+*]|\d)/.test(text)) return text;
  const lines = text.split("\n");
  let changed = false;
  for (let n = 0; n < lines.length; n++) {
    const line = lines[n];
    if (!NESTED_START.test(line)) continue;
    let depth = 0;
    let i = 0;
    while (i < line.length) {
      while (line[i] === " " || line[i] === "\t") i++;
      let marker = -1;
      if (line[i] === ">") {
        marker = i;
        i += 1;
      } else {
        const m = /^(?:[-+*]|\d{1,9}[.)])(?=[ \t]|$)/.exec(line.slice(i, i + 11));
        if (!m) break;
        marker = i + m[0].length - 1;
        i += m[0].length;
      }
      if (++depth > MAX_NESTING) {
        lines[n] = line.slice(0, marker) + LOOKALIKE[line[marker]] + line.slice(marker + 1);
        changed = true;
        break;
      }
    }
  }
  return changed ? lines.join("\n") : text;
}

/** Make the live nodes `old` (the last children of `parent`) look like `fresh`; the new list. */
function morphList(parent, old, fresh) {
  const live = fresh.map((node, i) => (i < old.length ? morph(old[i], node) : parent.appendChild(node)));
  for (let i = fresh.length; i < old.length; i++) old[i].remove();
  return live;
}

function morph(node, fresh) {
  if (node.isEqualNode(fresh)) return node;
  if (node.nodeType === Node.TEXT_NODE && fresh.nodeType === Node.TEXT_NODE) {
    node.data = fresh.data;
    return node;
  }
  if (node.nodeType !== Node.ELEMENT_NODE || !sameShell(node, fresh)) {
    node.replaceWith(fresh);
    return fresh;
  }
  morphList(node, [...node.childNodes], [...fresh.childNodes]);
  return node;
}

function sameShell(a, b) {
  if (a.nodeName !== b.nodeName || a.attributes.length !== b.attributes.length) return false;
  for (const { name, value } of b.attributes) if (a.getAttribute(name) !== value) return false;
  return true;
}

/** Renders one reply into `root`, again and again as it grows, at the cost of its open block. */
export class MarkdownView {
  constructor(root) {
    this.root = root;
    this.reset();
  }

  reset() {
    this.root.replaceChildren();
    this.text = "";
    this.final = false;
    this.frozenChars = 0; // the prefix of `text` whose blocks are rendered for good
    this.frozenSource = "";
    this.links = Object.create(null); // reference definitions seen in that prefix
    this.tail = []; // the nodes of the open block(s), replaced on every update
  }

  hasDefinitions(open) {
    return Object.keys(this.links).length > 0 || /^ {0,3}\[[^\]]+\]:/m.test(open);
  }

  #lex(text) {
    renderStats.parsedChars += text.length;
    renderStats.longestParse = Math.max(renderStats.longestParse, text.length);
    const lexer = new Lexer(OPTIONS);
    Object.assign(lexer.tokens.links, this.links);
    try {
      return lexer.lex(text);
    } catch {
      return [plainBlock(text)]; // whatever marked cannot handle is shown as the model wrote it
    }
  }

  /** Show `text`, the whole reply so far; `final` once it has ended (nothing is held back). */
  update(text, final) {
    if (text.includes("\r")) text = text.replace(/\r\n?/g, "\n");
    if (text === this.text && final === this.final) return;
    if (!text.startsWith(this.frozenSource)) this.reset(); // not a continuation: start over
    const started = performance.now();
    this.text = text;
    this.final = final;
    let open = text.slice(this.frozenChars);
    const whole = final && this.hasDefinitions(open);
    if (whole) {
      // A reference link may be used before its definition: the one case where a later block
      // changes an earlier one. Model output rarely has any; when it does, render it whole once.
      this.links = Object.create(null);
      this.frozenChars = 0;
      open = text;
    }
    let shown = capNesting(final ? open : settled(open));
    let tokens = this.#lex(shown);
    if (!final) {
      const end = heldBack(shown, tokens);
      if (end < shown.length) {
        shown = shown.slice(0, end);
        tokens = this.#lex(shown);
      }
    }

    let keep = tokens.length;
    if (!final) {
      keep = tokens.findLastIndex((t) => t.type !== "space");
      if (keep < 0) keep = 0;
    }
    const done = tokens.slice(0, keep);
    const consumed = done.map((t) => t.raw).join("");
    let frozen = [];
    if (done.length && shown.startsWith(consumed)) {
      frozen = toNodes(done);
      for (const token of done) {
        if (token.type === "def") this.links[token.tag] ??= { href: token.href, title: token.title };
      }
      this.frozenChars += consumed.length;
      this.frozenSource = text.slice(0, this.frozenChars);
    } else {
      keep = 0;
    }
    // The DOM already shows most of this (the last render): change only what differs, so a
    // long open block (a list of hundreds of items) costs the browser little layout.
    const old = whole ? [...this.root.childNodes] : this.tail;
    const live = morphList(this.root, old, [...frozen, ...toNodes(tokens.slice(keep))]);
    this.tail = live.slice(frozen.length);

    const ms = performance.now() - started;
    renderStats.renders += 1;
    renderStats.longestMs = Math.max(renderStats.longestMs, ms);
  }
}

/** Render user text: exactly as typed, no formatting at all. */
export function renderPlain(text) {
  const p = document.createElement("p");
  p.textContent = text;
  return p;
}

/** What a screen reader should hear of a rendered reply: its text without code-block headers. */
export function spokenText(root) {
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode: (node) =>
      node.parentElement?.closest(".code-head") ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT,
  });
  let text = "";
  while (walker.nextNode()) text += walker.currentNode.data;
  return text.replace(/\s+/g, " ").trim();
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
