/*
 * Parlor chat widget.
 *
 * Embed it with
 *
 *   <script src="https://chat.example/widget.js" data-domain="shop" async></script>
 *
 * The server is the script's own origin; `data-domain` names the Parlor domain (default
 * "demo"); `data-color` (optional) sets the accent colour; `data-track="off"` stops the
 * visitor reports (docs/visitors.md). The widget draws a bubble in the
 * bottom-right corner that opens the conversation with the domain's assistant and, after a
 * hand-off, with a human agent (docs/handoff.md).
 *
 * How it works, in short:
 * - Identity: a visitor token from POST /api/visitor-token, kept in localStorage per domain,
 *   so the visitor is the same in every tab and after a reload. The room is
 *   `support-{visitorId}`.
 * - Transport: one WebSocket (`/ws?token=…`). Every message has a per-room `seq`; the widget
 *   draws each seq once, in order, and rejoins with `since` = the last seq drawn after any
 *   disconnect, with exponential back-off and full jitter.
 * - Everything lives in a shadow root, so the host page's CSS and ours never meet.
 *
 * No framework, no build step, no request to any other host. The helpers it shares with the
 * agent inbox (web/common.js) are pasted in by the server, so this stays one script.
 */
(() => {
  'use strict';

  // document.currentScript is only set while the script first runs, so read it now.
  const script = document.currentScript;
  if (!script || window.ParlorWidget) return; // loaded twice: keep the first

  const SERVER = new URL(script.src, location.href).origin;
  const WS_SERVER = SERVER.replace(/^http/, 'ws');
  const DOMAIN = script.dataset.domain || 'demo';
  // Only a real colour goes into the style sheet.
  const ACCENT = script.dataset.color && CSS.supports('color', script.dataset.color) ? script.dataset.color : '#4f46e5';
  const STORAGE_KEY = `parlor:visitor:${DOMAIN}`;
  const OPEN_KEY = `parlor:open:${DOMAIN}`;
  // Visitor tracking (see "Visitor tracking" below); `data-track="off"` turns it off.
  const TRACK = script.dataset.track !== 'off';
  const SEEN_KEY = `parlor:seen:${DOMAIN}`;
  const REPORT_EVERY_MS = 4 * 60 * 1000; // the server counts a report for 5 minutes

  const TOKEN_MARGIN_MS = 60000; // fetch a new token this long before the old one expires
  // The largest message the server takes, in UTF-8 bytes, until room-joined says
  // (`limits.messageBytes`); this is the server's default `limits.max_message_bytes`.
  const DEFAULT_MAX_MESSAGE_BYTES = 16384;
  const COUNTER_FROM = 0.8; // show the counter from this share of the limit on
  const TOO_LONG = 'Your message is too long to send. Please shorten it, or send it in parts.';

  // ---------------------------------------------------------------------------------------
  // Small helpers. h, inline, richText, formatTime, the socket helpers and the timings
  // shared with the inbox are in web/common.js: the server puts it in place of the next line.
  /* @include common.js */

  /** localStorage, or a stand-in when the page may not use it (private modes, sandboxes). */
  const store = (() => {
    const memory = new Map();
    const ok = (() => {
      try {
        const probe = '__parlor_probe__';
        localStorage.setItem(probe, '1');
        localStorage.removeItem(probe);
        return true;
      } catch {
        return false;
      }
    })();
    return {
      get: (key) => (ok ? localStorage.getItem(key) : memory.get(key) ?? null),
      set: (key, value) => (ok ? localStorage.setItem(key, value) : memory.set(key, value)),
      remove: (key) => (ok ? localStorage.removeItem(key) : memory.delete(key)),
    };
  })();

  // ---------------------------------------------------------------------------------------
  // Styles (inside the shadow root; the host page's CSS does not reach them)

  const STYLES = `
    :host { all: initial; }
    * { box-sizing: border-box; }
    .root {
      --accent: ${ACCENT};
      --accent-text: #fff;
      --bg: #fff;
      --fg: #1f2330;
      --muted: #667085;
      --line: #e4e7ec;
      --theirs: #f2f4f7;
      --notice: #f8f9fb;
      font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Ubuntu, sans-serif;
      color: var(--fg);
    }
    button { font: inherit; color: inherit; }
    .bubble {
      position: fixed; right: 24px; bottom: 24px; z-index: 2147483000;
      width: 60px; height: 60px; border-radius: 50%; border: none; cursor: pointer;
      background: var(--accent); color: var(--accent-text);
      box-shadow: 0 6px 20px rgba(16, 24, 40, .25);
      display: grid; place-items: center; transition: transform .15s ease;
    }
    .bubble:hover { transform: scale(1.05); }
    .bubble:focus-visible { outline: 3px solid var(--fg); outline-offset: 3px; }
    .bubble svg { width: 28px; height: 28px; fill: currentColor; }
    .badge {
      position: absolute; top: -2px; right: -2px; min-width: 22px; height: 22px; padding: 0 6px;
      border-radius: 11px; background: #d92d20; color: #fff; font-size: 12px; font-weight: 700;
      display: grid; place-items: center; border: 2px solid #fff;
    }
    .badge[hidden] { display: none; }
    .panel {
      position: fixed; right: 24px; bottom: 100px; z-index: 2147483000;
      width: 380px; height: min(620px, calc(100vh - 124px)); max-height: calc(100dvh - 124px);
      display: flex; flex-direction: column; overflow: hidden;
      background: var(--bg); border-radius: 16px; border: 1px solid var(--line);
      box-shadow: 0 16px 48px rgba(16, 24, 40, .22);
    }
    .panel[hidden] { display: none; }
    header {
      display: flex; align-items: center; gap: 12px; padding: 14px 14px 14px 16px;
      background: var(--accent); color: var(--accent-text);
    }
    .avatar {
      flex: none; width: 38px; height: 38px; border-radius: 50%; display: grid; place-items: center;
      background: rgba(255, 255, 255, .2); font-weight: 700; font-size: 16px;
    }
    .heading { flex: 1; min-width: 0; }
    .title { margin: 0; font-size: 16px; font-weight: 650; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
    .subtitle { margin: 0; font-size: 13px; opacity: .9; display: flex; align-items: center; gap: 6px; }
    .dot { width: 8px; height: 8px; border-radius: 50%; background: #32d583; flex: none; }
    .root[data-conn="reconnecting"] .dot, .root[data-conn="connecting"] .dot { background: #fdb022; animation: pulse 1s infinite alternate; }
    @keyframes pulse { from { opacity: .35; } to { opacity: 1; } }
    .close {
      flex: none; width: 36px; height: 36px; border-radius: 50%; border: none; cursor: pointer;
      background: transparent; color: inherit; display: grid; place-items: center;
    }
    .close:hover { background: rgba(255, 255, 255, .18); }
    .close:focus-visible { outline: 2px solid #fff; }
    .close svg { width: 20px; height: 20px; fill: currentColor; }
    .log {
      flex: 1; overflow-y: auto; margin: 0; padding: 16px 14px 8px; list-style: none;
      display: flex; flex-direction: column; gap: 10px; overscroll-behavior: contain;
    }
    .empty { color: var(--muted); text-align: center; margin: auto 12px; font-size: 14px; }
    .msg { display: flex; flex-direction: column; max-width: 82%; }
    .msg.mine { align-self: flex-end; align-items: flex-end; }
    .msg.theirs { align-self: flex-start; align-items: flex-start; }
    .msg.notice { align-self: center; align-items: center; max-width: 92%; text-align: center; }
    .author { font-size: 12px; color: var(--muted); margin: 0 4px 2px; }
    .text {
      padding: 9px 13px; border-radius: 16px; white-space: pre-wrap; overflow-wrap: anywhere;
    }
    .text a { color: inherit; }
    .text p { margin: 0; white-space: normal; }
    .text p + p { margin-top: 8px; }
    .text code { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: rgba(16, 24, 40, .07); border-radius: 4px; padding: 0 4px; }
    .mine .text code { background: rgba(255, 255, 255, .2); }
    .mine .text { background: var(--accent); color: var(--accent-text); border-bottom-right-radius: 4px; }
    .theirs .text { background: var(--theirs); border-bottom-left-radius: 4px; }
    .notice .text { background: var(--notice); color: var(--muted); font-size: 13px; border: 1px solid var(--line); border-radius: 12px; display: inline-flex; align-items: center; gap: 6px; }
    .icon { width: 1em; height: 1em; flex: none; fill: none; stroke: currentColor; stroke-width: 2; stroke-linecap: round; stroke-linejoin: round; }
    .notice[data-event="assign"] .icon, .notice[data-event="reopen"] .icon { color: #067647; }
    .notice[data-event="escalate"] .icon, .notice[data-event="unassign"] .icon { color: #b42318; }
    .streaming .text > :last-child::after { content: "▍"; animation: pulse .6s infinite alternate; margin-left: 1px; }
    .meta { font-size: 11px; color: var(--muted); margin: 2px 4px 0; display: flex; gap: 6px; }
    .files { display: flex; flex-wrap: wrap; gap: 6px; margin: 4px 0 0; max-width: 100%; }
    .file { font-size: 13px; color: inherit; text-decoration: underline; word-break: break-all; }
    .file.image img { display: block; max-width: 220px; max-height: 220px; border-radius: 10px; border: 1px solid var(--line); }
    .pending .text { opacity: .65; }
    .failed .text { background: #fee4e2; color: #912018; }
    .retry { border: none; background: none; color: #b42318; text-decoration: underline; cursor: pointer; padding: 0; font-size: 11px; }
    .seen { display: none; }
    .msg.is-seen-last .seen { display: inline; }
    .sources { font-size: 11px; color: var(--muted); margin: 3px 4px 0; }
    .source + .source::before { content: " · "; }
    .actions { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 6px; }
    .action {
      border: 1.5px solid var(--accent); color: var(--accent); background: var(--bg);
      border-radius: 999px; padding: 6px 14px; cursor: pointer; font-weight: 600; font-size: 14px;
    }
    .action:hover:not(:disabled) { background: var(--accent); color: var(--accent-text); }
    .action:focus-visible { outline: 2px solid var(--fg); outline-offset: 2px; }
    .action:disabled { opacity: .45; cursor: default; }
    .earlier { align-self: center; }
    .typing { min-height: 22px; padding: 0 16px; font-size: 12px; color: var(--muted); font-style: italic; }
    .banner {
      margin: 0 12px 6px; padding: 6px 10px; border-radius: 8px; font-size: 13px;
      background: #fffaeb; color: #93370d; border: 1px solid #fedf89;
    }
    .banner[hidden] { display: none; }
    form { display: flex; gap: 8px; padding: 10px 12px 12px; border-top: 1px solid var(--line); align-items: flex-end; }
    .sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
    textarea {
      flex: 1; resize: none; font: inherit; color: var(--fg); background: var(--bg);
      border: 1px solid var(--line); border-radius: 12px; padding: 9px 12px; max-height: 120px; min-height: 42px;
    }
    textarea:focus { outline: 2px solid var(--accent); outline-offset: -1px; border-color: transparent; }
    .send {
      flex: none; width: 42px; height: 42px; border-radius: 50%; border: none; cursor: pointer;
      background: var(--accent); color: var(--accent-text); display: grid; place-items: center;
    }
    .send:disabled { opacity: .4; cursor: default; }
    .attach {
      flex: none; width: 36px; height: 42px; border: none; background: none; cursor: pointer;
      color: var(--muted); display: grid; place-items: center;
    }
    .attach:focus-visible { outline: 2px solid var(--fg); outline-offset: 2px; }
    .attach svg { width: 20px; height: 20px; fill: currentColor; }
    .send:focus-visible { outline: 2px solid var(--fg); outline-offset: 2px; }
    .send svg { width: 20px; height: 20px; fill: currentColor; }
    .counter { margin: -6px 16px 6px; text-align: right; font-size: 12px; color: var(--muted); font-variant-numeric: tabular-nums; }
    .counter.over { color: #b42318; font-weight: 600; }
    .counter[hidden] { display: none; }
    .footer { text-align: center; font-size: 11px; color: var(--muted); padding: 0 0 8px; }
    @media (max-width: 480px) {
      .panel { inset: 0; width: auto; height: auto; max-height: none; border-radius: 0; border: none; }
      .root[data-open="true"] .bubble { display: none; }
      .bubble { right: 16px; bottom: 16px; }
    }
    /* Below 16px, iOS zooms the page into a field that gets the focus. */
    @media (max-width: 480px), (pointer: coarse) {
      textarea { font-size: 16px; }
    }
    @media (prefers-reduced-motion: reduce) {
      .bubble, .streaming .text > :last-child::after, .dot { transition: none; animation: none; }
    }
  `;

  const ICON_CHAT =
    '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 3C6.5 3 2 6.9 2 11.7c0 2.4 1.1 4.6 3 6.2L4 22l4.5-2.3c1.1.3 2.3.5 3.5.5 5.5 0 10-3.9 10-8.7S17.5 3 12 3z"/></svg>';
  const ICON_CLOSE =
    '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M18.3 5.7a1 1 0 0 0-1.4 0L12 10.6 7.1 5.7a1 1 0 0 0-1.4 1.4l4.9 4.9-4.9 4.9a1 1 0 1 0 1.4 1.4l4.9-4.9 4.9 4.9a1 1 0 0 0 1.4-1.4L13.4 12l4.9-4.9a1 1 0 0 0 0-1.4z"/></svg>';
  const ICON_ATTACH =
    '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M16.5 6.5v10a4.5 4.5 0 0 1-9 0V5a3 3 0 0 1 6 0v10.5a1.5 1.5 0 0 1-3 0V6.5H9v9a3 3 0 0 0 6 0V5a4.5 4.5 0 0 0-9 0v11.5a6 6 0 0 0 12 0v-10z"/></svg>';
  const ICON_SEND =
    '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M3.4 20.4 21 12 3.4 3.6 3.4 10l12.6 2-12.6 2z"/></svg>';

  // ---------------------------------------------------------------------------------------
  // DOM

  const host = h('div', { id: 'parlor-widget', 'data-domain': DOMAIN });
  const shadow = host.attachShadow({ mode: 'open' });
  const ui = {};

  function buildUi() {
    ui.badge = h('span', { class: 'badge', hidden: true, 'aria-hidden': 'true' });
    ui.bubble = h('button', {
      class: 'bubble',
      type: 'button',
      'aria-label': 'Open chat',
      'aria-expanded': 'false',
      'aria-controls': 'parlor-panel',
      onclick: () => (state.open ? closePanel() : openPanel()),
    });
    ui.bubble.innerHTML = ICON_CHAT;
    ui.bubble.append(ui.badge);

    ui.avatar = h('div', { class: 'avatar', 'aria-hidden': 'true' }, 'A');
    ui.title = h('h2', { class: 'title', id: 'parlor-title' }, 'Assistant');
    ui.subtitleText = h('span', {}, '');
    ui.subtitle = h('p', { class: 'subtitle', id: 'parlor-subtitle' }, h('span', { class: 'dot' }), ui.subtitleText);
    const close = h('button', { class: 'close', type: 'button', 'aria-label': 'Close chat', onclick: () => closePanel() });
    close.innerHTML = ICON_CLOSE;

    ui.log = h('ol', {
      class: 'log',
      role: 'log',
      'aria-live': 'polite',
      'aria-relevant': 'additions',
      'aria-label': 'Conversation',
      tabindex: '0',
    });
    ui.empty = h('li', { class: 'empty' }, 'Ask us anything: our assistant answers right away, and a person from our team is a click away.');
    ui.log.append(ui.empty);
    ui.typing = h('div', { class: 'typing', 'aria-live': 'polite' });
    ui.banner = h('div', { class: 'banner', role: 'status', hidden: true });

    ui.input = h('textarea', {
      id: 'parlor-input',
      rows: '1',
      placeholder: 'Write a message…',
      'aria-describedby': 'parlor-counter',
      autocomplete: 'off',
      oninput: onInput,
      onkeydown: (event) => {
        if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
          event.preventDefault();
          submit();
        }
      },
    });
    ui.send = h('button', { class: 'send', type: 'submit', 'aria-label': 'Send message', disabled: true });
    // Near the limit: how much of it the draft uses. No maxlength: it would cut a pasted text.
    ui.counter = h('div', { class: 'counter', id: 'parlor-counter', hidden: true });
    ui.send.innerHTML = ICON_SEND;
    // A file goes to the room first, then as a message of its own (docs/files.md).
    ui.fileInput = h('input', {
      type: 'file',
      hidden: true,
      accept: 'image/png,image/jpeg,image/gif,image/webp,application/pdf,text/plain',
      onchange: () => {
        const file = ui.fileInput.files[0];
        ui.fileInput.value = '';
        attachFile(file);
      },
    });
    ui.attach = h('button', { class: 'attach', type: 'button', 'aria-label': 'Attach a file', onclick: () => ui.fileInput.click() });
    ui.attach.innerHTML = ICON_ATTACH;
    const form = h(
      'form',
      {
        onsubmit: (event) => {
          event.preventDefault();
          submit();
        },
      },
      h('label', { class: 'sr-only', for: 'parlor-input' }, 'Message'),
      ui.attach,
      ui.fileInput,
      ui.input,
      ui.send,
    );

    ui.panel = h(
      'section',
      {
        class: 'panel',
        id: 'parlor-panel',
        role: 'dialog',
        'aria-labelledby': 'parlor-title',
        'aria-describedby': 'parlor-subtitle',
        hidden: true,
        onkeydown: (event) => {
          if (event.key === 'Escape') {
            event.stopPropagation();
            closePanel();
          }
        },
      },
      h('header', {}, ui.avatar, h('div', { class: 'heading' }, ui.title, ui.subtitle), close),
      ui.log,
      ui.typing,
      ui.banner,
      form,
      ui.counter,
      h('div', { class: 'footer' }, 'Powered by Parlor'),
    );

    ui.root = h('div', { class: 'root', 'data-conn': 'idle', 'data-open': 'false' }, ui.panel, ui.bubble);
    // A constructed style sheet is not inline style, so the widget works under a host
    // page's Content-Security-Policy without 'unsafe-inline' (docs/security.md); browsers
    // without them get a <style> element.
    if ('adoptedStyleSheets' in shadow && typeof CSSStyleSheet === 'function' && 'replaceSync' in CSSStyleSheet.prototype) {
      const sheet = new CSSStyleSheet();
      sheet.replaceSync(STYLES);
      shadow.adoptedStyleSheets = [sheet];
      shadow.append(ui.root);
    } else {
      shadow.append(h('style', {}, STYLES), ui.root);
    }
  }

  // ---------------------------------------------------------------------------------------
  // State

  const state = {
    open: false,
    identity: null, // {token, userId, expiresAt}
    roomId: null,
    conn: 'idle', // idle | connecting | online | reconnecting
    status: 'bot', // bot | waiting | assigned | resolved
    assignee: null, // {userId, name}
    service: null, // {assistant, people, open}: who answers here (from room-joined)
    statusSeq: -1, // the seq the status is known as of
    lastSeq: 0, // the highest seq drawn
    lastReadSent: 0,
    othersReadSeq: 0, // the furthest an agent has read
    unread: 0,
    maxBytes: DEFAULT_MAX_MESSAGE_BYTES, // the server's limit on a message (from room-joined)
  };
  const drawn = new Map(); // seq -> <li>
  const storedClientIds = new Set(); // clientMessageIds of drawn messages
  const pending = new Map(); // clientMessageId -> {li, text, state}
  const streams = new Map(); // messageId of a streamed reply -> {li, textEl, text, index}
  const typists = new Map(); // userId -> {name, timer}

  // ---------------------------------------------------------------------------------------
  // Identity

  function savedIdentity() {
    try {
      const saved = JSON.parse(store.get(STORAGE_KEY) || 'null');
      if (saved && saved.token && saved.userId && Date.parse(saved.expiresAt) - Date.now() > TOKEN_MARGIN_MS) {
        return saved;
      }
    } catch {
      // unreadable: fetch a new one
    }
    return null;
  }

  /** Asks the server for a visitor identity, unless another tab already has one. */
  async function obtainIdentity() {
    const fetchOne = async () => {
      const existing = savedIdentity();
      if (existing) return existing;
      const response = await fetch(`${SERVER}/api/visitor-token`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ domainId: DOMAIN }),
      });
      if (!response.ok) {
        const error = new Error(`visitor token: HTTP ${response.status}`);
        error.retryAfterMs = Number(response.headers.get('Retry-After')) * 1000 || 0;
        error.fatal = response.status === 403 || response.status === 404;
        throw error;
      }
      const body = await response.json();
      const identity = { token: body.token, userId: body.userId, expiresAt: body.expiresAt };
      store.set(STORAGE_KEY, JSON.stringify(identity));
      return identity;
    };
    // Two tabs opening the widget at the same moment must end up as one visitor.
    if (navigator.locks && navigator.locks.request) {
      return navigator.locks.request(`parlor-visitor-${DOMAIN}`, fetchOne);
    }
    return fetchOne();
  }

  function adoptIdentity(identity) {
    const changed = !state.identity || state.identity.userId !== identity.userId;
    state.identity = identity;
    if (changed) {
      state.roomId = `support-${identity.userId}`;
      resetConversation();
      if (reportedId && reportedId !== identity.userId) reportVisit();
    }
  }

  /** Whether the server still accepts our token (a 401 means it does not). */
  async function tokenRefused() {
    try {
      const response = await fetch(`${SERVER}/api/rooms/${encodeURIComponent(state.roomId)}/messages?limit=1`, {
        headers: { Authorization: `Bearer ${state.identity.token}` },
      });
      return response.status === 401;
    } catch {
      return false; // the server is unreachable; that says nothing about the token
    }
  }

  // ---------------------------------------------------------------------------------------
  // Connection

  let ws = null;
  let attempt = 0; // reconnect attempts since the last successful join
  let failedOpens = 0; // sockets in a row that never opened
  let reconnectTimer = null;
  let joined = false;
  let started = false;
  let connecting = false; // between deciding to connect and having a socket

  async function start() {
    if (started) return;
    started = true;
    await connect();
  }

  async function connect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (ws || connecting) return;
    connecting = true;
    setConn(attempt === 0 && state.lastSeq === 0 ? 'connecting' : 'reconnecting');
    try {
      adoptIdentity(savedIdentity() || (await obtainIdentity()));
    } catch (error) {
      connecting = false;
      if (error.fatal) {
        showBanner('Chat is not available on this site.');
        setConn('idle');
        return;
      }
      scheduleReconnect(error.retryAfterMs);
      return;
    }
    connecting = false;
    ws = openSocket(`${WS_SERVER}/ws?token=${encodeURIComponent(state.identity.token)}`, {
      isCurrent: (socket) => ws === socket,
      onOpen: (socket) => {
        failedOpens = 0;
        join();
        pinger.start(socket);
      },
      onFrame: handleFrame,
      onGone: onSocketGone,
    });
  }

  /** The socket closed, failed to open, or went silent: back off and connect again. */
  async function onSocketGone(socket, opened) {
    if (ws !== socket) return; // already handled
    ws = null;
    joined = false;
    pinger.stop();
    clearTypists();
    setConn('reconnecting');
    if (!opened && ++failedOpens >= 2) {
      connecting = true;
      if (await tokenRefused()) {
        // The server no longer accepts our token (its keys changed): become a new visitor.
        store.remove(STORAGE_KEY);
        failedOpens = 0;
      }
      connecting = false;
    }
    scheduleReconnect();
  }

  /** Waits random(0, min(cap, start × 2^attempt)) — full jitter — then reconnects. */
  function scheduleReconnect(atLeastMs = 0) {
    clearTimeout(reconnectTimer);
    const delay = Math.max(atLeastMs, backoffMs(attempt));
    attempt += 1;
    reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (!started || ws || connecting) return;
    attempt = 0;
    connect();
  }

  function send(frame) {
    return sendFrame(ws, frame);
  }

  // `request(frame, onReply)` sends a frame with an id; `onReply` gets the reply or the
  // error frame, which handleFrame passes to `answer`.
  const { request, answer } = requests('w', send);

  const pinger = keepAlive(send, (socket) => {
    onSocketGone(socket, true);
    socket.close();
  });

  function join() {
    const frame = { type: 'join-room', roomId: state.roomId };
    if (state.lastSeq > 0) frame.since = state.lastSeq;
    // Where the visitor is, for the agent (once a page; the server adds the browser).
    if (!state.contextSent) {
      state.contextSent = true;
      frame.context = {
        page: location.href.slice(0, 512),
        title: document.title.slice(0, 512),
        referrer: document.referrer.slice(0, 512),
        language: navigator.language || '',
        timeZone: (Intl.DateTimeFormat().resolvedOptions().timeZone) || '',
      };
    }
    request(frame);
  }

  function setConn(conn) {
    state.conn = conn;
    ui.root.dataset.conn = conn;
    renderHeader();
  }

  // ---------------------------------------------------------------------------------------
  // Frames from the server

  function handleFrame(frame) {
    answer(frame);
    if (frame.roomId && frame.roomId !== state.roomId && frame.type !== 'error') return;
    switch (frame.type) {
      case 'room-joined':
        joined = true;
        attempt = 0;
        // A reply being streamed comes again as one catch-up delta with the text so far.
        for (const messageId of [...streams.keys()]) dropStream(messageId);
        if (frame.service) state.service = frame.service;
        if (frame.limits && frame.limits.messageBytes > 0) {
          state.maxBytes = frame.limits.messageBytes;
          onInput();
        }
        if (frame.status) applyStatus(frame.status, frame.assignee ?? null, frame.lastSeq ?? 0);
        setConn('online');
        break;
      case 'message-history':
        for (const message of frame.messages || []) drawMessage(message, false);
        if (!frame.more) onCaughtUp();
        break;
      case 'message-received':
        drawMessage(frame, true);
        break;
      case 'message-ack':
        markSent(frame.clientMessageId);
        break;
      case 'message-delta':
        onDelta(frame);
        break;
      case 'typing':
        onTyping(frame);
        break;
      case 'read-receipt':
        if (frame.userId !== state.identity.userId && frame.seq > state.othersReadSeq) {
          state.othersReadSeq = frame.seq;
          renderSeen();
        }
        break;
      case 'room-status':
        if (frame.conversation) {
          applyStatus(frame.conversation.status, frame.conversation.assignee ?? null, frame.seq ?? state.statusSeq);
        }
        break;
      case 'agent-joined':
        state.assignee = frame.agent ?? state.assignee;
        if (state.status === 'bot' || state.status === 'waiting') state.status = 'assigned';
        renderStatus();
        break;
      case 'agent-left':
        if (state.assignee && frame.agent && state.assignee.userId === frame.agent.userId) {
          state.assignee = null;
          renderStatus();
        }
        break;
      case 'reconnect':
        // The server is restarting; close 1012 follows. Come back quickly, with jitter.
        attempt = 0;
        break;
      case 'pong':
        pinger.pong();
        break;
      case 'error':
        // Errors of our own requests are handled by their callbacks; a refused join leaves
        // nothing to show, so say so.
        if (!joined && frame.code === 'forbidden') showBanner('This conversation is not available.');
        break;
      default:
        break; // presence and frames of later versions: nothing to draw
    }
  }

  function onCaughtUp() {
    // What we sent while away: the catch-up has it if the server stored it; send the rest
    // again with the same clientMessageId (the server drops duplicates).
    for (const [clientMessageId, item] of pending) {
      if (item.state === 'failed') continue;
      sendPending(clientMessageId);
    }
    renderEarlier();
    scheduleRead();
  }

  /** A join without `since` brings the latest messages; older ones come on request. */
  function renderEarlier() {
    const firstSeq = Math.min(...drawn.keys());
    const show = Number.isFinite(firstSeq) && firstSeq > 1;
    if (!show) {
      if (ui.earlier) ui.earlier.remove();
      ui.earlier = null;
      return;
    }
    if (!ui.earlier) {
      ui.earlier = h('li', { class: 'earlier' }, h('button', { class: 'action', type: 'button', onclick: loadEarlier }, 'Show earlier messages'));
    }
    ui.log.prepend(ui.earlier);
  }

  function loadEarlier() {
    const firstSeq = Math.min(...drawn.keys());
    request({ type: 'history', roomId: state.roomId, before: firstSeq, limit: 50 }, (reply) => {
      if (reply.type !== 'history') return;
      // Keep the visitor's place: what they were reading stays where it is.
      const fromBottom = ui.log.scrollHeight - ui.log.scrollTop;
      for (const message of reply.messages || []) drawMessage(message, false, true);
      ui.log.scrollTop = ui.log.scrollHeight - fromBottom;
      renderEarlier();
    });
  }

  // ---------------------------------------------------------------------------------------
  // Drawing messages

  /** Forgets the drawn conversation (a new identity); unsent messages stay to be sent. */
  function resetConversation() {
    for (const li of drawn.values()) li.remove();
    for (const messageId of [...streams.keys()]) dropStream(messageId);
    drawn.clear();
    storedClientIds.clear();
    Object.assign(state, { status: 'bot', assignee: null, statusSeq: -1, lastSeq: 0, lastReadSent: 0, othersReadSeq: 0, unread: 0 });
    ui.empty.hidden = pending.size > 0;
    renderEarlier();
    renderStatus();
    renderBadge();
  }

  function isMine(message) {
    return message.userId === state.identity.userId;
  }

  /**
   * Draws a stored message once, in seq order. `live`: it arrived now, not in a catch-up;
   * `older`: from "Show earlier messages" (no scrolling, no state change).
   */
  function drawMessage(message, live, older = false) {
    if (typeof message.seq !== 'number' || drawn.has(message.seq)) return;
    const nearBottom = !older && isNearBottom(ui.log);

    if (message.clientMessageId) {
      storedClientIds.add(message.clientMessageId);
      if (streams.has(message.clientMessageId)) dropStream(message.clientMessageId);
      if (isMine(message) && pending.has(message.clientMessageId)) {
        pending.get(message.clientMessageId).li.remove();
        pending.delete(message.clientMessageId);
      }
    }
    if (message.userId) stopTyping(message.userId);

    const li = renderMessage(message);
    li.dataset.seq = String(message.seq);
    insertBySeq(ui.log, li, message.seq);
    drawn.set(message.seq, li);
    ui.empty.hidden = true;
    if (message.seq > state.lastSeq) state.lastSeq = message.seq;

    // A stored status notice: the state as of its seq (history tells us what we missed).
    const data = message.data || {};
    if (message.role === 'system' && data.event === 'status' && data.status) {
      retireActionsBefore(message.seq);
      applyStatus(data.status, data.assignee ?? null, message.seq);
    } else if (li.classList.contains('has-actions') && [...drawn.keys()].some((seq) => seq > message.seq && isStatusNotice(drawn.get(seq)))) {
      // An older offer drawn after the notices that followed it: already answered.
      li.classList.add('actions-retired');
      renderActions(li);
    }
    if (!isMine(message) && live && (!state.open || document.hidden)) {
      state.unread += 1;
      renderBadge();
    }
    if (isMine(message)) renderSeen();
    if (nearBottom || isMine(message)) scrollToBottom();
    scheduleRead();
  }

  function renderMessage(message) {
    const data = message.data || {};
    const kind = message.role === 'system' ? 'notice' : isMine(message) ? 'mine' : 'theirs';
    const li = h('li', { class: `msg ${kind}`, 'data-role': message.role || '', 'data-event': kind === 'notice' ? data.action || null : null });
    if (message.role === 'system' && data.event === 'status') li.dataset.status = 'true';
    if (kind === 'theirs') {
      const label = message.role === 'assistant' ? message.userName || 'Assistant' : message.userName || 'Support';
      li.append(h('div', { class: 'author' }, label));
    }
    const text = kind === 'notice'
      ? h('div', { class: 'text' }, ...noticeNodes(message))
      : h('div', { class: 'text' }, ...richText(String(message.message ?? ''), message.role === 'assistant'));
    if (message.timestamp) text.title = new Date(message.timestamp).toLocaleString();
    const files = attachmentNodes(message, SERVER, state.identity?.token);
    // A message of files alone shows no empty bubble.
    if (!files || String(message.message ?? '').trim()) li.append(text);
    if (files) li.append(files);
    const sources = renderSources(message);
    if (sources) li.append(sources);

    // Buttons the bot offers, such as "Connect with Customer Support".
    // Only the assistant's (and the server's) offers: another member's message cannot plant a button.
    const trusted = message.role === 'assistant' || message.role === 'system';
    const actions = trusted && Array.isArray(data.actions) ? data.actions.filter((a) => a && a.id && a.label) : [];
    if (actions.length) {
      const row = h('div', { class: 'actions' });
      for (const action of actions) {
        row.append(
          h('button', {
            class: 'action',
            type: 'button',
            'data-action': action.id,
            'aria-label': action.label,
            onclick: (event) => runAction(action, event.currentTarget),
          }, action.label),
        );
      }
      li.append(row);
      li.classList.add('has-actions');
      renderActions(li);
    }
    if (kind !== 'notice') {
      const meta = h('div', { class: 'meta' }, h('time', { datetime: message.timestamp || '' }, formatTime(message.timestamp)));
      if (kind === 'mine') meta.append(h('span', { class: 'seen' }, 'Seen'));
      li.append(meta);
    }
    return li;
  }

  /**
   * The help pages an assistant's answer was taken from (`data.sources`), as small labels
   * under it: "Source: Pricing and licence › How much does Parlor cost?". Null when none.
   */
  function renderSources(message) {
    const list = message.role === 'assistant' && Array.isArray(message.data?.sources) ? message.data.sources : [];
    const labels = list
      .filter((s) => s && typeof (s.title || s.document) === 'string')
      .map((s) => h('span', { class: 'source', title: typeof s.document === 'string' ? s.document : null },
        typeof s.heading === 'string' && s.heading !== s.title ? `${s.title || s.document} › ${s.heading}` : s.title || s.document));
    return labels.length ? h('div', { class: 'sources' }, labels.length > 1 ? 'Sources: ' : 'Source: ', ...labels) : null;
  }

  function scrollToBottom() {
    ui.log.scrollTop = ui.log.scrollHeight;
  }

  // ---------------------------------------------------------------------------------------
  // Streamed replies (message-delta)

  function onDelta(frame) {
    const { messageId } = frame;
    if (!messageId || storedClientIds.has(messageId)) return; // already stored: a late delta
    let stream = streams.get(messageId);
    if (!stream) {
      const textEl = h('div', { class: 'text' });
      // Hidden from screen readers while it grows; the stored message is announced once.
      const li = h('li', { class: 'msg theirs streaming', 'aria-hidden': 'true' }, h('div', { class: 'author' }, 'Assistant'), textEl);
      stream = { li, textEl, text: '', index: -1 };
      streams.set(messageId, stream);
      const nearBottom = isNearBottom(ui.log);
      ui.log.append(li);
      ui.empty.hidden = true;
      if (nearBottom) scrollToBottom();
    }
    if (!applyDelta(stream, frame)) return;
    const nearBottom = isNearBottom(ui.log);
    stream.textEl.replaceChildren(...richText(stream.text, true));
    if (nearBottom) scrollToBottom();
  }

  function dropStream(messageId) {
    const stream = streams.get(messageId);
    if (stream) stream.li.remove();
    streams.delete(messageId);
  }

  // ---------------------------------------------------------------------------------------
  // Sending

  function submit() {
    const text = ui.input.value;
    if (!text.trim()) return;
    if (utf8Bytes(text) > state.maxBytes) {
      renderCounter();
      showBanner(TOO_LONG, 6000);
      ui.input.focus();
      return;
    }
    ui.input.value = '';
    autoSize();
    renderCounter();
    ui.send.disabled = true;
    stopOwnTyping();

    const clientMessageId = newClientId();
    const li = h(
      'li',
      { class: 'msg mine pending' },
      h('div', { class: 'text' }, ...richText(text)),
      h('div', { class: 'meta' }, h('span', { class: 'state' }, 'Sending…')),
    );
    ui.log.append(li);
    ui.empty.hidden = true;
    scrollToBottom();
    pending.set(clientMessageId, { li, text, state: 'queued' });
    if (!started) start();
    else sendPending(clientMessageId);
  }

  /** Why the server refused a file, for the visitor. */
  const FILE_REFUSED = {
    file_too_large: 'That file is too large to send.',
    file_type_not_allowed: 'That kind of file cannot be sent here.',
    too_many_files: 'This conversation cannot take more files.',
  };

  /** Uploads `file` into the room and sends it as a message; a banner says why not. */
  async function attachFile(file) {
    if (!file) return;
    if (!started) start();
    if (!joined || !state.identity) {
      showBanner('Connecting… attach the file again in a moment.', 4000);
      return;
    }
    const form = new FormData();
    form.append('roomId', state.roomId);
    form.append('file', file);
    try {
      const response = await fetch(`${SERVER}/api/files`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${state.identity.token}` },
        body: form,
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        showBanner(FILE_REFUSED[body.error?.code] || 'The file could not be sent.', 6000);
        return;
      }
      const frame = { type: 'send-message', roomId: state.roomId, message: '', clientMessageId: newClientId(), attachments: [{ fileId: body.fileId }] };
      request(frame, (reply) => {
        if (reply.type === 'error') showBanner('The file could not be sent.', 6000);
      });
    } catch {
      showBanner('The file could not be sent.', 6000);
    }
  }

  function sendPending(clientMessageId) {
    const item = pending.get(clientMessageId);
    if (!item || !joined) return; // sent after the next join's catch-up
    if (utf8Bytes(item.text) > state.maxBytes) {
      // Written before room-joined told us a lower limit: back to the input, whole.
      pending.delete(clientMessageId);
      item.li.remove();
      ui.input.value = ui.input.value ? `${item.text}\n${ui.input.value}` : item.text;
      onInput();
      showBanner(TOO_LONG, 6000);
      return;
    }
    item.state = 'sending';
    setPendingState(item, 'Sending…', false);
    request({ type: 'send-message', roomId: state.roomId, message: item.text, clientMessageId }, (reply) => {
      if (reply.type !== 'error' || !pending.has(clientMessageId)) return;
      item.state = 'failed';
      const reason = reply.code === 'message_too_long' ? 'Too long to send.' : reply.code === 'rate_limited' ? 'Slow down a little.' : 'Not sent.';
      setPendingState(item, reason, true, clientMessageId);
    });
  }

  function markSent(clientMessageId) {
    const item = clientMessageId && pending.get(clientMessageId);
    if (item) setPendingState(item, 'Sent', false);
  }

  function setPendingState(item, label, failed, clientMessageId) {
    item.li.classList.toggle('failed', failed);
    const meta = item.li.querySelector('.meta');
    meta.replaceChildren(h('span', { class: 'state' }, label));
    if (failed) {
      meta.append(
        h('button', {
          class: 'retry',
          type: 'button',
          onclick: () => {
            item.li.classList.remove('failed');
            item.state = 'queued';
            sendPending(clientMessageId);
          },
        }, 'Retry'),
      );
    }
  }

  // ---------------------------------------------------------------------------------------
  // Hand-off state and action buttons

  function applyStatus(status, assignee, asOfSeq) {
    if (asOfSeq < state.statusSeq) return; // older news than what we know
    state.statusSeq = asOfSeq;
    state.status = status;
    state.assignee = assignee;
    renderStatus();
  }

  function renderStatus() {
    renderHeader();
    for (const li of ui.log.querySelectorAll('.has-actions')) renderActions(li);
  }

  /** The header while nobody has taken the conversation: what is really there. */
  function botView() {
    const service = state.service || { assistant: true, people: true, open: true };
    if (service.assistant) {
      return ['Assistant', service.people ? 'AI assistant · a person when you need one' : 'AI assistant · replies instantly', 'A'];
    }
    if (service.people) {
      return service.open
        ? ['Support', 'A person will answer here shortly', 'S']
        : ['Support', 'We are away now · leave a message', 'S'];
    }
    return ['Messages', 'Leave a message', 'M'];
  }

  function renderHeader() {
    if (!ui.title) return;
    const agentName = state.assignee && state.assignee.name;
    const views = {
      bot: botView(),
      waiting: ['Waiting for an agent…', state.service && !state.service.open
        ? 'We are away now; a person will answer when we are back'
        : 'Someone from our team will be with you shortly', '…'],
      assigned: [agentName || 'Support agent', 'Support agent', (agentName || 'S').charAt(0).toUpperCase()],
      resolved: ['Conversation resolved', 'Write again any time to reopen it', '✓'],
    };
    const [title, subtitle, initial] = views[state.status] || views.bot;
    ui.title.textContent = title;
    ui.avatar.textContent = initial;
    ui.subtitleText.textContent =
      state.conn === 'reconnecting' ? 'Reconnecting…' : state.conn === 'connecting' ? 'Connecting…' : subtitle;
    ui.root.dataset.status = state.status;
  }

  /** Enables a message's buttons only while they still make sense. */
  function renderActions(li) {
    const retired = li.classList.contains('actions-retired');
    for (const button of li.querySelectorAll('.action')) {
      const used = button.dataset.used === 'true';
      const escalate = button.dataset.action === 'escalate';
      button.disabled = retired || used || (escalate && state.status !== 'bot');
    }
  }

  function isStatusNotice(li) {
    return li.dataset.status === 'true';
  }

  /** A status change retires the buttons of every message before it. */
  function retireActionsBefore(seq) {
    for (const li of ui.log.querySelectorAll('.has-actions')) {
      if (Number(li.dataset.seq) < seq) {
        li.classList.add('actions-retired');
        renderActions(li);
      }
    }
  }

  function runAction(action, button) {
    if (action.id !== 'escalate') return; // the only action this version knows
    const buttons = [...ui.log.querySelectorAll('.action[data-action="escalate"]')];
    const sent = request({ type: 'escalate', roomId: state.roomId }, (reply) => {
      if (reply.type === 'error') {
        for (const b of buttons) delete b.dataset.used;
        for (const li of ui.log.querySelectorAll('.has-actions')) renderActions(li);
        showBanner('We could not reach our team just now. Please try again.', 5000);
      }
    });
    if (!sent) {
      showBanner('You are offline. Try again once we have reconnected.', 5000);
      return;
    }
    for (const b of buttons) {
      b.dataset.used = 'true';
      b.disabled = true;
    }
    button.blur();
    ui.input.focus();
  }

  // ---------------------------------------------------------------------------------------
  // Typing indicators

  const ownTypingSignal = ownTyping((isTyping) => send({ type: 'typing', roomId: state.roomId, isTyping }));

  function onInput() {
    const over = renderCounter();
    ui.send.disabled = !ui.input.value.trim() || over;
    autoSize();
    if (!ui.input.value.trim()) {
      stopOwnTyping();
      return;
    }
    if (joined) ownTypingSignal.typed();
  }

  function stopOwnTyping() {
    ownTypingSignal.stop();
  }

  function onTyping(frame) {
    if (!frame.userId || frame.userId === state.identity.userId) return; // our other tabs
    if (frame.isTyping === false) {
      stopTyping(frame.userId);
      return;
    }
    const existing = typists.get(frame.userId);
    if (existing) clearTimeout(existing.timer);
    typists.set(frame.userId, {
      name: frame.userName || 'Someone',
      timer: setTimeout(() => stopTyping(frame.userId), TYPING_SHOW_MS),
    });
    renderTyping();
  }

  function stopTyping(userId) {
    const typist = typists.get(userId);
    if (!typist) return;
    clearTimeout(typist.timer);
    typists.delete(userId);
    renderTyping();
  }

  function clearTypists() {
    for (const userId of [...typists.keys()]) stopTyping(userId);
  }

  function renderTyping() {
    const names = [...typists.values()].map((t) => t.name);
    ui.typing.textContent = typingText(names);
  }

  /** Shows how much of the server's limit the draft uses, from COUNTER_FROM of it on; says whether it is over. */
  function renderCounter() {
    const text = ui.input.value;
    const max = state.maxBytes;
    // A UTF-16 unit is at most 3 UTF-8 bytes: a short draft needs no counting.
    const bytes = text.length * 3 < max * COUNTER_FROM ? 0 : utf8Bytes(text);
    const over = bytes > max;
    ui.counter.hidden = bytes < max * COUNTER_FROM;
    ui.counter.classList.toggle('over', over);
    const count = `${bytes.toLocaleString()} / ${max.toLocaleString()}`;
    ui.counter.textContent = over ? `${count} · too long to send` : count;
    ui.input.setAttribute('aria-invalid', over ? 'true' : 'false');
    return over;
  }

  function autoSize() {
    ui.input.style.height = 'auto';
    ui.input.style.height = `${Math.min(ui.input.scrollHeight + 2, 120)}px`;
  }

  // ---------------------------------------------------------------------------------------
  // Read receipts

  let readTimer = null;

  /** Tells the server how far the visitor has read, when they can actually see the panel. */
  function scheduleRead() {
    if (readTimer) return;
    readTimer = setTimeout(() => {
      readTimer = null;
      if (!state.open || document.hidden || !joined) return;
      if (state.lastSeq > state.lastReadSent) {
        state.lastReadSent = state.lastSeq;
        send({ type: 'read', roomId: state.roomId, seq: state.lastSeq });
      }
    }, 250);
  }

  /** "Seen" goes under the latest of the visitor's messages that an agent has read. */
  function renderSeen() {
    let latest = null;
    for (const [seq, li] of drawn) {
      li.classList.remove('is-seen-last');
      if (seq <= state.othersReadSeq && li.classList.contains('mine') && (!latest || seq > Number(latest.dataset.seq))) {
        latest = li;
      }
    }
    if (latest) latest.classList.add('is-seen-last');
  }

  // ---------------------------------------------------------------------------------------
  // Panel

  /** Shows or hides the panel, and remembers which for a reload of this tab. */
  function setOpen(open) {
    state.open = open;
    ui.panel.hidden = !open;
    ui.root.dataset.open = String(open);
    ui.bubble.setAttribute('aria-expanded', String(open));
    ui.bubble.setAttribute('aria-label', open ? 'Close chat' : 'Open chat');
    try {
      if (open) sessionStorage.setItem(OPEN_KEY, '1');
      else sessionStorage.removeItem(OPEN_KEY);
    } catch {
      // not kept: fine
    }
  }

  function openPanel() {
    setOpen(true);
    state.unread = 0;
    renderBadge();
    start();
    scrollToBottom();
    ui.input.focus();
    scheduleRead();
  }

  function closePanel() {
    setOpen(false);
    stopOwnTyping();
    ui.bubble.focus();
  }

  function renderBadge() {
    if (!ui.badge) return;
    ui.badge.hidden = state.unread === 0;
    ui.badge.textContent = state.unread > 9 ? '9+' : String(state.unread);
    ui.bubble.setAttribute('aria-label', state.open ? 'Close chat' : state.unread ? `Open chat, ${state.unread} new` : 'Open chat');
  }

  let bannerTimer = null;
  function showBanner(text, forMs) {
    clearTimeout(bannerTimer);
    ui.banner.textContent = text;
    ui.banner.hidden = false;
    if (forMs) bannerTimer = setTimeout(() => (ui.banner.hidden = true), forMs);
  }

  // ---------------------------------------------------------------------------------------
  // Visitor tracking (docs/visitors.md): the page reports its visitor when it loads and
  // every few minutes while it is shown, so the site's owner sees who is on the site now
  // (a report counts for 5 minutes; leaving is not reported, since every link followed on
  // the site would report it). The visitor is the chat's visitor id once the browser has
  // one (so page and chat count as one visitor), a random id kept per domain before.

  let lastReport = 0;
  let reportedId = null;

  function trackingId() {
    const identity = state.identity || savedIdentity();
    if (identity && identity.userId) return identity.userId;
    let id = store.get(SEEN_KEY);
    if (!id || !/^[A-Za-z0-9_.:@-]{1,128}$/.test(id)) {
      const bytes = crypto.getRandomValues(new Uint8Array(12));
      id = `v_${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
      store.set(SEEN_KEY, id);
    }
    return id;
  }

  function reportVisit() {
    if (!TRACK || document.hidden) return;
    lastReport = Date.now();
    const id = trackingId();
    // The browser got its chat identity: the id it was counted under before leaves.
    if (reportedId && reportedId !== id) reportLeft(reportedId);
    reportedId = id;
    const visitorData = {
      page: location.href.slice(0, 2048),
      referrer: document.referrer.slice(0, 2048),
      title: document.title.slice(0, 200),
    };
    fetch(`${SERVER}/visitors/add`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ domainId: DOMAIN, visitorId: id, visitorData }),
      keepalive: true,
    }).catch(() => {}); // counting is best effort: the chat never waits on it
  }

  function reportLeft(id) {
    if (!TRACK || !id || !navigator.sendBeacon) return;
    // A beacon outlives the page; as text/plain it needs no preflight.
    navigator.sendBeacon(`${SERVER}/visitors/remove`, JSON.stringify({ domainId: DOMAIN, visitorId: id }));
  }

  function startTracking() {
    if (!TRACK) return;
    reportVisit();
    setInterval(reportVisit, REPORT_EVERY_MS);
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && Date.now() - lastReport > REPORT_EVERY_MS) reportVisit();
    });
    // Back from the back-forward cache: the page is shown again.
    window.addEventListener('pageshow', (event) => event.persisted && reportVisit());
  }

  // ---------------------------------------------------------------------------------------
  // Start

  function mount() {
    buildUi();
    document.body.append(host);
    renderHeader();
    document.addEventListener('visibilitychange', () => {
      if (document.hidden) return;
      if (state.open) {
        state.unread = 0;
        renderBadge();
      }
      scheduleRead();
      reconnectNow(); // a tab woken from the background need not wait out its back-off
    });
    window.addEventListener('online', reconnectNow);

    startTracking();
    // A returning visitor connects at once (to see replies that came while away); a new
    // one only when they open the chat, so a page view costs no token and no socket.
    if (savedIdentity()) start();
    let reopen = false;
    try {
      reopen = sessionStorage.getItem(OPEN_KEY) === '1';
    } catch {
      // no session storage: start closed
    }
    if (reopen) openPanel();
  }

  window.ParlorWidget = Object.freeze({ open: () => openPanel(), close: () => closePanel() });
  if (document.body) mount();
  else document.addEventListener('DOMContentLoaded', mount, { once: true });
})();
