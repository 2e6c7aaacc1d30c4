/*
 * Code shared by the chat widget (web/widget.js) and the agent inbox (web/inbox.html).
 *
 * Not a script of its own: no page loads it. The server (src/transport/web.rs) pastes it
 * into each of the two pages in place of their one marker line, a block comment that reads
 * `@include common.js`, so the widget stays one self-contained script. The marker stands
 * inside each page's own `(() => { 'use strict'; … })()` scope, so all this file declares
 * (plain `const` and `function` declarations: the timings and the helpers below) is private
 * to that page's scope: no globals, and nothing runs when it is pasted in. The `const`s are
 * only there from the marker on, so the marker goes before any code that runs at once and
 * uses them; the page must not declare the same names.
 *
 * No framework, no request to any other host; and no closing script tag (the inbox has the
 * file inside its script element).
 */

// Reconnecting, keep-alive and typing indicators: the same timings on both sides.
const BACKOFF_START_MS = 500;
const BACKOFF_CAP_MS = 15000;
const PING_EVERY_MS = 25000;
const PONG_TIMEOUT_MS = 10000;
const TYPING_THROTTLE_MS = 2000;
const TYPING_IDLE_MS = 3000;
const TYPING_SHOW_MS = 6000; // forget a typist who went quiet without saying so

// -----------------------------------------------------------------------------------------
// DOM

/** Creates an element with attributes, properties (`.name`), listeners (`on…`) and children. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('.')) el[key.slice(1)] = value;
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child);
  }
  return el;
}

/** Inline text as DOM nodes (never HTML): `code`, **bold** and http(s) links; the rest plain. */
function inline(text) {
  const parts = [];
  const token = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\bhttps?:\/\/[^\s<>"]+[^\s<>".,;:!?)\]])/g;
  let last = 0;
  for (const match of text.matchAll(token)) {
    if (match.index > last) parts.push(text.slice(last, match.index));
    const [whole, code, bold, url] = match;
    if (code) parts.push(h('code', {}, code.slice(1, -1)));
    else if (bold) parts.push(h('strong', {}, bold.slice(2, -2)));
    else if (url) parts.push(h('a', { href: url, target: '_blank', rel: 'noopener noreferrer' }, url));
    last = match.index + whole.length;
  }
  if (last < text.length) parts.push(text.slice(last));
  return parts;
}

// Inline SVG icons (drawn with the text colour), instead of emoji that every system
// draws differently.
const ICONS = {
  alert: '<circle cx="12" cy="12" r="9"/><path d="M12 7.5v5.5M12 16.5v.01"/>',
  check: '<circle cx="12" cy="12" r="9"/><path d="m8 12.5 3 3 5-6"/>',
  done: '<path d="M5 12.5l4.5 4.5L19 7.5"/>',
  person: '<circle cx="12" cy="8" r="4"/><path d="M4.5 20.5c.8-3.6 3.9-5.5 7.5-5.5s6.7 1.9 7.5 5.5"/>',
  swap: '<path d="M7 7h12l-3-3M17 17H5l3 3"/>',
  bot: '<rect x="4" y="8" width="16" height="12" rx="3"/><path d="M12 4.5V8M9 13v1.5M15 13v1.5"/>',
  info: '<circle cx="12" cy="12" r="9"/><path d="M12 11v5.5M12 7.5v.01"/>',
};
/** By a status notice's `data.action`. */
const EVENT_ICON = { escalate: 'alert', assign: 'check', reopen: 'check', transfer: 'swap', unassign: 'person', resolve: 'done' };

function icon(name) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('class', 'icon');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  svg.innerHTML = ICONS[name] || ICONS.info;
  return svg;
}

/** The server's notices start with an emoji (the seeds' texts); the icon replaces it. */
function withoutLeadingEmoji(text) {
  return text.replace(/^[\p{Extended_Pictographic}\u{FE0F}\u{200D}\s]+/u, '');
}

const UTF8 = new TextEncoder();

/** The size of `text` as the server counts it: UTF-8 bytes, not characters. */
function utf8Bytes(text) {
  return UTF8.encode(text).length;
}

/** A system notice's text as DOM nodes: its icon (by `data.action`), then the words. */
function noticeNodes(message) {
  const data = message.data || {};
  return [icon(EVENT_ICON[data.action] || 'info'), h('span', {}, ...inline(withoutLeadingEmoji(String(message.message ?? ''))))];
}

/**
 * Message text as DOM nodes (never as HTML). People's messages keep their line breaks;
 * the assistant writes Markdown, so its paragraphs are reflowed (a single line break is a
 * space), list lines stay lines, and `code` and **bold** are drawn.
 */
function richText(text, markdown = false) {
  if (!markdown) return inline(text);
  const paragraphs = text.trim().split(/\n\s*\n/);
  return paragraphs.map((paragraph) => {
    const lines = paragraph.split('\n');
    const isList = lines.every((line) => /^\s*([-*•]|\d+[.)])\s/.test(line));
    const p = h('p');
    if (isList) {
      lines.forEach((line, i) => {
        if (i > 0) p.append(h('br'));
        p.append(...inline(line.trim()));
      });
    } else {
      p.append(...inline(lines.map((line) => line.trim()).join(' ')));
    }
    return p;
  });
}

// -----------------------------------------------------------------------------------------
// Files

/** Raster images a browser may show in place; any other file is a download link. */
const INLINE_IMAGES = ['image/png', 'image/jpeg', 'image/gif', 'image/webp'];

/** A size for people: "532 B", "48 KB", "2.1 MB". */
function formatSize(bytes) {
  const n = Number(bytes) || 0;
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${Math.round(n / 1024)} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

/**
 * The files a message carries (`data.attachments`, described by the server): images shown
 * in place, other files as download links. `server` is Parlor's origin; `token` goes in the
 * query, since an image cannot send a header. Null when there are none.
 */
function attachmentNodes(message, server, token) {
  const list = Array.isArray(message.data?.attachments) ? message.data.attachments : [];
  const query = token ? `?token=${encodeURIComponent(token)}` : '';
  const items = list
    .filter((a) => a && typeof a.url === 'string' && a.url.startsWith('/api/files/'))
    .map((a) => {
      const href = `${server}${a.url}${query}`;
      const name = typeof a.name === 'string' ? a.name : 'file';
      return INLINE_IMAGES.includes(a.contentType)
        ? h('a', { class: 'file image', href, target: '_blank', rel: 'noopener noreferrer', title: name },
          h('img', { src: href, alt: name, loading: 'lazy' }))
        : h('a', { class: 'file', href, rel: 'noopener noreferrer', title: name }, `${name} · ${formatSize(a.size)}`);
    });
  return items.length ? h('div', { class: 'files' }, ...items) : null;
}

/** "14:05" in the reader's locale; '' for a missing or unreadable time. */
function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return '';
  return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

/** Whether a scrolled log is (nearly) at its end, so that a new message should scroll it. */
function isNearBottom(log) {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

/** Puts a seq'd message in place: after every lower seq, before pending and streamed items. */
function insertBySeq(log, li, seq) {
  let before = null;
  for (const item of log.querySelectorAll('.msg')) {
    const itemSeq = item.dataset.seq ? Number(item.dataset.seq) : Infinity;
    if (itemSeq > seq) {
      before = item;
      break;
    }
  }
  log.insertBefore(li, before);
}

/** "Ann is typing…", "Ann and Bob are typing…", or '' for nobody. */
function typingText(names) {
  if (names.length === 0) return '';
  return names.length === 1 ? `${names[0]} is typing…` : `${names.join(' and ')} are typing…`;
}

// -----------------------------------------------------------------------------------------
// Messages and frames

/** A clientMessageId: the server drops a second message with the same one. */
function newClientId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return `c-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

/** A frame from the server, or null if it is not JSON. */
function parseFrame(data) {
  try {
    return JSON.parse(data);
  } catch {
    return null;
  }
}

/**
 * Opens a WebSocket to `url` and returns it: `onOpen(socket)` once it is open, `onFrame(frame)`
 * for each frame (JSON) that comes while `isCurrent(socket)`, and `onGone(socket, opened)`
 * when it closes, or fails to open (`opened` false).
 */
function openSocket(url, { isCurrent, onOpen, onFrame, onGone }) {
  const socket = new WebSocket(url);
  let opened = false;
  socket.addEventListener('open', () => {
    opened = true;
    onOpen(socket);
  });
  socket.addEventListener('message', (event) => {
    if (!isCurrent(socket)) return;
    const frame = parseFrame(event.data);
    if (frame) onFrame(frame);
  });
  socket.addEventListener('close', () => onGone(socket, opened));
  return socket;
}

/** Sends a frame if the socket is open; whether it went. */
function sendFrame(socket, frame) {
  if (!socket || socket.readyState !== WebSocket.OPEN) return false;
  socket.send(JSON.stringify(frame));
  return true;
}

/**
 * Frames with an id (`${prefix}1`, `${prefix}2`, …) and the callbacks waiting for their
 * replies. `send(frame)` says whether the frame went; `request` returns the same.
 * `answer(frame)` hands a reply (`replyTo`) to its callback and says whether it had one.
 */
function requests(prefix, send) {
  let nextId = 1;
  const waiting = new Map(); // request id -> callback(frame)
  return {
    request(frame, onReply) {
      const id = `${prefix}${nextId++}`;
      if (!send({ ...frame, id })) return false;
      if (onReply) waiting.set(id, onReply);
      return true;
    },
    answer(frame) {
      if (frame.replyTo === undefined || frame.replyTo === null || !waiting.has(frame.replyTo)) return false;
      const callback = waiting.get(frame.replyTo);
      waiting.delete(frame.replyTo);
      callback(frame);
      return true;
    },
  };
}

/**
 * Pings every PING_EVERY_MS while started. A ping with no pong within PONG_TIMEOUT_MS means
 * the connection is dead without having said so (a sleeping laptop, a NAT that forgot us):
 * `onSilent(socket)` then gives up on the socket it was started for, rather than wait for
 * the close handshake. `pong()` on every pong frame; `stop()` when the socket goes.
 */
function keepAlive(send, onSilent) {
  let pingTimer = null;
  let pongTimer = null;
  const stop = () => {
    clearInterval(pingTimer);
    clearTimeout(pongTimer);
  };
  return {
    start(socket) {
      stop();
      pingTimer = setInterval(() => {
        if (!send({ type: 'ping' })) return;
        clearTimeout(pongTimer);
        pongTimer = setTimeout(() => onSilent(socket), PONG_TIMEOUT_MS);
      }, PING_EVERY_MS);
    },
    stop,
    pong: () => clearTimeout(pongTimer),
  };
}

/**
 * Our own typing indicator, for `sendTyping(isTyping)`: `typed()` on a keystroke says
 * `true` at most every TYPING_THROTTLE_MS, and `false` follows TYPING_IDLE_MS after the last
 * keystroke; `stop()` says `false` at once (if `true` was said).
 */
function ownTyping(sendTyping) {
  let lastSent = 0;
  let idleTimer = null;
  const stop = () => {
    clearTimeout(idleTimer);
    if (lastSent) {
      lastSent = 0;
      sendTyping(false);
    }
  };
  return {
    typed() {
      const now = Date.now();
      if (now - lastSent > TYPING_THROTTLE_MS) {
        lastSent = now;
        sendTyping(true);
      }
      clearTimeout(idleTimer);
      idleTimer = setTimeout(stop, TYPING_IDLE_MS);
    },
    stop,
  };
}

/** How long to wait before reconnect attempt `attempt` (0, 1, …): full jitter, random(0, min(cap, start × 2^attempt)). */
function backoffMs(attempt) {
  return Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_START_MS * 2 ** attempt);
}

/**
 * Adds a `message-delta` frame to a streamed reply `{text, index}`: a catch-up delta (after
 * a join) is the whole text so far; a live one is appended unless it was seen already.
 * Whether the text changed.
 */
function applyDelta(stream, frame) {
  if (frame.catchUp) {
    stream.text = String(frame.delta ?? '');
    stream.index = frame.index ?? stream.index;
    return true;
  }
  if (typeof frame.index === 'number' && frame.index <= stream.index) return false;
  stream.text += String(frame.delta ?? '');
  stream.index = frame.index ?? stream.index + 1;
  return true;
}
