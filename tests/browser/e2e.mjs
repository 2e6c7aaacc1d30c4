// End-to-end tests of the widget (/widget.js on the demo page /) and the agent inbox (/inbox)
// in headless Chromium, against the real Parlor binary.
//
//   PARLOR_BIN=target/debug/parlor PARLOR_TEST_CHROMIUM=/usr/bin/chromium node tests/browser/e2e.mjs
//
// The script starts the server on a free 127.0.0.1 port with a fresh SQLite database, plays
// one story, checking at every step what a person would see in the page, and stops the
// server at the end, also on failure. The story: a visitor chats with the bot (a streamed
// answer) and asks for a person; an agent signs in to the inbox, takes the waiting room and
// talks with the visitor (typing indicators, read receipts), who sends an image and a file;
// a second visitor's escalation alerts the agent; a second tab of the first visitor stays in sync; the server restarts
// mid-conversation (nothing lost, nothing twice); the agent resolves and the visitor
// reopens; a phone-sized screen; notes, transfer and unassign with a second agent; paging
// back through a long conversation; the statistics page; the widget against a scripted
// socket (catch-up delta, repeated and late frames, rejoin with `since`); and a server
// whose development login is off. Screenshots go to PARLOR_TEST_OUT (default
// target/browser): widget.png, inbox.png, widget-phone.png, stats.png, and failure-N.png
// of every page when a step fails. Nothing here talks to any host but 127.0.0.1. Set PARLOR_TEST_VERBOSE=1 to see the pages' console.
//
// `cargo test --test browser` runs this script (tests/browser.rs).

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { chromium } from 'playwright-core';

const BIN = process.env.PARLOR_BIN;
const CHROMIUM = process.env.PARLOR_TEST_CHROMIUM;
const OUT = path.resolve(process.env.PARLOR_TEST_OUT || 'target/browser');
const TOTAL_TIMEOUT_MS = 4 * 60 * 1000;
const STEP_TIMEOUT_MS = 15000;

if (!BIN || !CHROMIUM) {
  console.error('Set PARLOR_BIN (the parlor binary) and PARLOR_TEST_CHROMIUM (e.g. /usr/bin/chromium).');
  process.exit(2);
}

// ---------------------------------------------------------------------------------------
// The server under test

/** A free TCP port on 127.0.0.1 (the OS picks it; we release it for the server). */
function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.unref();
    probe.on('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

class Server {
  /** `configFile`: a parlor.toml for this server (PARLOR_CONFIG), else the caller's. */
  constructor(port, database, configFile = null) {
    this.port = port;
    this.database = database;
    this.configFile = configFile;
    this.base = `http://127.0.0.1:${port}`;
    this.child = null;
    this.logLines = [];
  }

  /** Starts the binary and waits until GET /health answers 200. */
  async start() {
    const env = { ...process.env };
    // The demo assistant must answer from its shipped knowledge base, the same everywhere.
    for (const key of ['OPENAI_API_KEY', 'OPENAI_BASE_URL', 'ANTHROPIC_API_KEY', 'GOOGLE_AI_API_KEY', 'GEMINI_API_KEY']) delete env[key];
    delete env.PARLOR_BIN; // ours, not the server's (it would warn about it)
    env.PARLOR_LIMITS__IP_VISITOR_TOKENS_PER_MINUTE = '100';
    env.NO_COLOR = '1';
    if (this.configFile) env.PARLOR_CONFIG = this.configFile;
    const child = spawn(BIN, ['serve', '--listen', `127.0.0.1:${this.port}`, '--database', `sqlite://${this.database}`], {
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    const keep = (chunk) => {
      for (const line of chunk.toString().split('\n')) {
        if (!line) continue;
        this.logLines.push(line);
        if (this.logLines.length > 400) this.logLines.shift();
      }
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    child.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));

    const deadline = Date.now() + 20000;
    let exited = null;
    child.exited.then((how) => (exited = how));
    while (Date.now() < deadline) {
      if (exited) throw new Error(`the server exited at start-up (${JSON.stringify(exited)})`);
      try {
        const response = await fetch(`${this.base}/health`);
        if (response.ok) return;
      } catch {
        // not listening yet
      }
      await sleep(100);
    }
    throw new Error('the server did not answer /health within 20 s');
  }

  /** SIGTERM (a graceful shutdown), then SIGKILL if it takes too long. */
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    this.child = null;
    child.kill('SIGTERM');
    const result = await Promise.race([child.exited, sleep(15000).then(() => null)]);
    if (!result) {
      child.kill('SIGKILL');
      await child.exited;
      throw new Error('the server did not stop within 15 s of SIGTERM');
    }
  }

  tail(n = 60) {
    return this.logLines.slice(-n).join('\n');
  }
}

// ---------------------------------------------------------------------------------------
// Small helpers

class Failure extends Error {}

function check(condition, message) {
  if (!condition) throw new Failure(message);
}

/** Polls `probe` until it returns a truthy value; fails with `what` after the timeout. */
async function eventually(what, probe, timeout = STEP_TIMEOUT_MS) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Failure(`timed out waiting for ${what}${last instanceof Error ? ` (${last.message})` : ''}`);
    await sleep(100);
  }
}

/** Waits until the locator is visible; the failure names what a person would miss. */
async function visible(locator, what, timeout = STEP_TIMEOUT_MS) {
  try {
    await locator.first().waitFor({ state: 'visible', timeout });
  } catch {
    throw new Failure(`not shown: ${what}`);
  }
}

async function json(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    throw new Failure(`expected JSON from ${response.url}, got HTTP ${response.status}: ${text.slice(0, 200)}`);
  }
}

// ---------------------------------------------------------------------------------------
// What the pages show

/** The widget inside a page (its shadow root is open; Playwright's locators pierce it). */
function widget(page) {
  const root = page.locator('#parlor-widget');
  return {
    page,
    bubble: page.getByRole('button', { name: /open chat|close chat/i }),
    panel: root.locator('.panel'),
    input: page.getByRole('textbox', { name: 'Message' }),
    log: page.getByRole('log', { name: 'Conversation' }),
    title: root.locator('.title'),
    subtitle: root.locator('.subtitle'),
    typing: root.locator('.typing'),
    mine: (text) => root.locator('.msg.mine[data-seq]', { hasText: text }),
    theirs: (text) => root.locator('.msg.theirs[data-seq]', { hasText: text }),
    notice: (text) => root.locator('.msg.notice[data-seq]', { hasText: text }),
    any: (text) => root.locator('.msg[data-seq]', { hasText: text }),
    /** The seqs drawn, in DOM order. */
    seqs: () => root.locator('.msg[data-seq]').evaluateAll((els) => els.map((el) => Number(el.dataset.seq))),
    texts: () => root.locator('.msg[data-seq] .text').allInnerTexts(),
    async open() {
      if (!(await this.panel.isVisible())) await page.getByRole('button', { name: /open chat/i }).click();
      await visible(this.panel, 'the chat panel');
    },
    async say(text) {
      await this.input.click();
      await this.input.pressSequentially(text, { delay: 15 });
      await this.input.press('Enter');
    },
    visitor: () => page.evaluate(() => JSON.parse(localStorage.getItem('parlor:visitor:demo'))),
  };
}

function inbox(page) {
  return {
    page,
    entry: (roomId) => page.locator(`.conv[data-room="${roomId}"]`),
    log: page.getByRole('log', { name: 'Messages' }),
    msg: (text) => page.locator('#log .msg[data-seq]', { hasText: text }),
    reply: page.getByRole('textbox', { name: 'Reply to the visitor' }),
    typing: page.locator('#typing'),
    status: page.locator('#conv-status'),
    button: (name) => page.getByRole('button', { name, exact: true }),
    seqs: () => page.locator('#log .msg[data-seq]').evaluateAll((els) => els.map((el) => Number(el.dataset.seq))),
    agent: () => page.evaluate(() => JSON.parse(localStorage.getItem('parlor:inbox:agent'))),
  };
}

/** Strictly increasing, so no seq is drawn twice and none out of order. */
function assertOrdered(seqs, where) {
  for (let i = 1; i < seqs.length; i++) {
    check(seqs[i] > seqs[i - 1], `${where}: messages out of order or drawn twice: seqs ${seqs.join(',')}`);
  }
}

// ---------------------------------------------------------------------------------------
// The story

const steps = [];
let outage = false; // console errors about the lost connection are expected meanwhile
const consoleProblems = [];

/**
 * Records console errors and uncaught exceptions of a page; they fail the run. `expected`
 * matches the errors a scenario causes on purpose (Chromium logs every failed request).
 */
function watch(page, name, expected = null) {
  page.on('pageerror', (error) => consoleProblems.push(`${name}: uncaught ${error.message}`));
  page.on('console', (message) => {
    if (process.env.PARLOR_TEST_VERBOSE) console.log(`  [${name}] console.${message.type()}: ${message.text()}`);
    if (message.type() !== 'error') return;
    const text = message.text();
    if (outage && /WebSocket connection to|ERR_CONNECTION_REFUSED|Failed to fetch/.test(text)) return;
    if (expected && expected.test(text)) return;
    consoleProblems.push(`${name}: console error: ${text}`);
  });
  return page;
}

async function main() {
  fs.mkdirSync(OUT, { recursive: true });
  for (const old of fs.readdirSync(OUT)) if (/^failure-\d+\.png$/.test(old)) fs.rmSync(path.join(OUT, old));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'parlor-browser-'));
  const server = new Server(await freePort(), path.join(dir, 'parlor.db'));
  let browser = null;
  const pages = [];
  const extraServers = [];

  const cleanup = async () => {
    if (browser) await browser.close().catch(() => {});
    browser = null;
    for (const other of extraServers) await other.stop().catch(() => {});
    await server.stop().catch((e) => console.error(`stopping the server: ${e.message}`));
    fs.rmSync(dir, { recursive: true, force: true });
  };
  for (const signal of ['SIGINT', 'SIGTERM']) {
    process.on(signal, async () => {
      console.error(`\n${signal}: stopping`);
      await cleanup();
      process.exit(130);
    });
  }
  const overall = setTimeout(async () => {
    console.error(`\nFAIL: the run took longer than ${TOTAL_TIMEOUT_MS / 1000} s`);
    console.error(`--- server log (last lines) ---\n${server.tail()}`);
    await cleanup();
    process.exit(1);
  }, TOTAL_TIMEOUT_MS);
  overall.unref();

  const step = async (name, body) => {
    const started = Date.now();
    await body();
    steps.push(name);
    console.log(`ok ${steps.length} - ${name} (${Date.now() - started} ms)`);
  };

  try {
    await server.start();
    console.log(`server: ${server.base} (database ${server.database})`);
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
    });
    const visitorContext = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const agentContext = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const shot = async (page, file) => {
      await page.screenshot({ path: path.join(OUT, file) });
    };
    const vPage = watch(await visitorContext.newPage(), 'widget');
    pages.push(vPage);
    const w = widget(vPage);
    let roomId = null;
    let agentToken = null;
    const aPage = watch(await agentContext.newPage(), 'inbox');
    pages.push(aPage);
    const ib = inbox(aPage);

    await step('customer chat: the demo page, the widget, "Hello!" at once and the bot answers', async () => {
      await vPage.goto(`${server.base}/`);
      await visible(vPage.getByRole('heading', { level: 1 }), 'the demo page heading');
      check((await vPage.getByRole('link', { name: /agent inbox/i }).first().getAttribute('href')) === '/inbox', 'the demo page links to /inbox');
      await w.open();
      const focused = await vPage.evaluate(() => document.querySelector('#parlor-widget').shadowRoot.activeElement?.id);
      check(focused === 'parlor-input', `opening the chat puts the focus in the message box (it is on ${focused})`);
      check((await w.title.innerText()) === 'Assistant', 'the header says "Assistant" while the bot answers');

      await w.input.fill('Hello!');
      const sentAt = Date.now();
      await w.input.press('Enter');
      // Drawn at once (before the server answers), then replaced by the stored message.
      await visible(vPage.locator('#parlor-widget .msg.mine', { hasText: 'Hello!' }), '"Hello!" right after sending', 1000);
      check(Date.now() - sentAt < 1000, '"Hello!" shows within a second');
      await visible(w.mine('Hello!'), '"Hello!" stored (with its seq)');
      roomId = `support-${(await w.visitor()).userId}`;
      // The bot's answer: whatever it says, it is not the visitor's.
      await eventually('the bot to answer "Hello!"', async () => (await vPage.locator('#parlor-widget .msg[data-seq]:not(.mine)').count()) >= 1);
      check((await w.mine('Hello!').count()) === 1, '"Hello!" is drawn once');

      // A streamed answer: message-delta text first, replaced by the stored reply.
      await vPage.evaluate(() => {
        const root = document.querySelector('#parlor-widget').shadowRoot;
        window.__sawStream = false;
        new MutationObserver((records) => {
          for (const r of records) for (const n of r.addedNodes) if (n.classList && n.classList.contains('streaming')) window.__sawStream = true;
        }).observe(root.querySelector('.log'), { childList: true });
      });
      await w.say('How do I catch up after a reconnect?');
      await visible(w.theirs('since'), 'the assistant\'s answer about `since`');
      check(await vPage.evaluate(() => window.__sawStream), 'the answer streamed in (message-delta) before it was stored');
      await eventually('the streamed text to be replaced by the stored reply', async () => (await vPage.locator('#parlor-widget .streaming').count()) === 0);
      check((await w.theirs('since').count()) === 1, 'the streamed answer is drawn once');
    });

    await step('escalation: the bot offers a person; the button puts the visitor in the queue', async () => {
      await w.say('I need to speak with a human');
      const offer = vPage.getByRole('button', { name: 'Connect with Customer Support' });
      await visible(offer, 'the "Connect with Customer Support" button');
      await offer.last().click();
      await visible(w.notice('Connecting you to a support agent…'), '"Connecting you to a support agent…"');
      await eventually('the header to say "Waiting for an agent…"', async () => (await w.title.innerText()) === 'Waiting for an agent…');
      check(await offer.last().isDisabled(), 'the offer\'s button is disabled once the room waits');
    });

    await step('agent assignment: development login, the waiting entry, "Assign to me"', async () => {
      await aPage.goto(`${server.base}/inbox`);
      await aPage.getByLabel('Development login').fill('Alice');
      await aPage.getByRole('button', { name: 'Sign in to the demo' }).click();
      await visible(aPage.getByText('Signed in as Alice'), 'the signed-in agent\'s name');
      agentToken = (await ib.agent()).token;
      const entry = ib.entry(roomId);
      await visible(entry, 'the waiting conversation in the inbox');
      const text = await entry.innerText();
      check(await entry.locator('.pill.waiting svg.icon').count() === 1 && text.includes('Waiting'), `the waiting entry has the waiting badge with its icon (it reads "${text}")`);
      check(/waiting \d+ (s|min)/.test(text), `the waiting entry shows how long it has waited (it reads "${text}")`);
      await entry.click();
      // The full history, the bot's turns and the status notices included.
      await visible(ib.msg('Hello!'), 'the visitor\'s "Hello!" in the inbox');
      await visible(ib.msg('since'), 'the bot\'s earlier answer in the inbox');
      await visible(ib.msg('Connecting you to a support agent'), 'the escalation notice in the inbox');
      await ib.button('Assign to me').click();
      await visible(w.notice("You're now connected to Alice"), '"You\'re now connected to Alice" in the widget');
      await eventually('the widget header to name Alice', async () => (await w.title.innerText()) === 'Alice');
      await visible(aPage.getByText('Assigned to you'), '"Assigned to you" in the inbox');
    });

    await step('real time: messages both ways, typing indicators, read receipts', async () => {
      await ib.reply.click();
      await ib.reply.pressSequentially('Hi! How can I help you?', { delay: 20 });
      await eventually('"Alice is typing…" in the widget', async () => (await w.typing.innerText()) === 'Alice is typing…');
      await ib.reply.press('Enter');
      await visible(w.theirs('Hi! How can I help you?'), 'the agent\'s message in the widget');
      check((await w.theirs('Hi! How can I help you?').locator('.author').innerText()) === 'Alice', 'the agent\'s message carries her name');
      await eventually('the typing indicator to go', async () => (await w.typing.innerText()) === '');

      await w.input.click();
      await w.input.pressSequentially('I have a question', { delay: 20 });
      await eventually('the visitor typing in the inbox', async () => /is typing…/.test(await ib.typing.innerText()));
      await w.input.press('Enter');
      await visible(ib.msg('I have a question'), 'the visitor\'s reply in the inbox');
      // The inbox has the conversation open, so it reads it: "Seen" in the widget.
      await visible(w.mine('I have a question').locator('.seen'), '"Seen" under the visitor\'s message');
      // And the widget (open, visible) reads the agent's message.
      await visible(ib.msg('Hi! How can I help you?').locator('.seen'), '"Seen by the visitor" in the inbox');
      check((await w.mine('I have a question').count()) === 1 && (await ib.msg('I have a question').count()) === 1, 'each message is drawn once');
    });

    let visitorB = null;
    await step('files: the visitor attaches an image and a text file; the image is shown in place, the text file is a download, in the widget and the inbox', async () => {
      const png = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==', 'base64');
      const input = vPage.locator('#parlor-widget input[type="file"]');
      await input.setInputFiles({ name: 'dot.png', mimeType: 'image/png', buffer: png });
      const loaded = (img) => img.evaluate((el) => el.complete && el.naturalWidth === 1);
      const widgetImage = vPage.locator('#parlor-widget .msg.mine[data-seq] img[alt="dot.png"]');
      await visible(widgetImage, 'the image in the widget');
      await eventually('the image to load in the widget', () => loaded(widgetImage));
      const inboxImage = aPage.locator('#log .msg[data-seq] img[alt="dot.png"]');
      await visible(inboxImage, 'the image in the inbox');
      await eventually('the image to load in the inbox', () => loaded(inboxImage));
      await input.setInputFiles({ name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('order 1234\n') });
      const widgetLink = vPage.locator('#parlor-widget .msg.mine[data-seq] a.file', { hasText: 'notes.txt' });
      await visible(widgetLink, 'the text file as a link in the widget');
      const inboxLink = aPage.locator('#log .msg[data-seq] a.file', { hasText: 'notes.txt' });
      await visible(inboxLink, 'the text file as a link in the inbox');
      // The link downloads the bytes, as an attachment.
      const href = await inboxLink.getAttribute('href');
      const response = await fetch(new URL(href, server.base));
      check(response.status === 200 && (await response.text()) === 'order 1234\n', `the inbox's link reads the file (HTTP ${response.status})`);
      check(/attachment/.test(response.headers.get('content-disposition') || ''), 'the text file is served as a download');
    });

    await step('a newly waiting conversation alerts the agent (title, badge, sound)', async () => {
      await aPage.evaluate(() => {
        window.__alerts = [];
        window.addEventListener('parlor-inbox:waiting', (e) => window.__alerts.push(e.detail.roomId));
      });
      const contextB = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      const pageB = watch(await contextB.newPage(), 'widget B');
      pages.push(pageB);
      visitorB = widget(pageB);
      await pageB.goto(`${server.base}/`);
      await visitorB.open();
      await visitorB.say('Can I talk to a person?');
      const offer = pageB.getByRole('button', { name: 'Connect with Customer Support' });
      await visible(offer, 'the offer in the second visitor\'s widget');
      await offer.last().click();
      const roomB = `support-${(await visitorB.visitor()).userId}`;
      await eventually('the inbox title to announce the waiting room', async () => (await aPage.title()) === '(1) 🚨 Parlor Inbox');
      check((await aPage.evaluate(() => window.__alerts)).includes(roomB), 'the inbox raised its alert for the new waiting room');
      const text = await ib.entry(roomB).innerText();
      check(text.includes('Waiting') && /waiting \d+ s/.test(text), `the new entry is marked waiting (it reads "${text}")`);
      const unreadBadge = await ib.entry(roomB).locator('.unread').innerText();
      check(Number(unreadBadge) >= 3, `the new entry counts its unread messages (${unreadBadge})`);
      check((await aPage.locator('.conv').first().getAttribute('data-room')) === roomB, 'waiting rooms are listed first');
      visitorB.roomId = roomB;
    });

    await step('screenshots: widget.png and inbox.png mid-conversation', async () => {
      await shot(vPage, 'widget.png');
      await shot(aPage, 'inbox.png');
    });

    await step('two visitor tabs stay in sync, each message once', async () => {
      const tab2 = watch(await visitorContext.newPage(), 'widget tab 2');
      pages.push(tab2);
      const w2 = widget(tab2);
      w.tab2 = w2;
      await tab2.goto(`${server.base}/`);
      await w2.open();
      await visible(w2.theirs('Hi! How can I help you?'), 'the conversation so far in the second tab (same visitor)');
      check((await w2.visitor()).userId === (await w.visitor()).userId, 'both tabs are the same visitor');
      await w2.say('Sent from the second tab');
      await visible(w.mine('Sent from the second tab'), 'the second tab\'s message in the first tab');
      await visible(ib.msg('Sent from the second tab'), 'the second tab\'s message in the inbox');
      check((await w.mine('Sent from the second tab').count()) === 1, 'it is drawn once in the first tab');
      check((await w2.mine('Sent from the second tab').count()) === 1, 'it is drawn once in the second tab');
      const [one, two] = [await w.seqs(), await w2.seqs()];
      assertOrdered(one, 'first tab');
      check(JSON.stringify(one.slice(-5)) === JSON.stringify(two.slice(-5)), `both tabs end with the same messages (${one.slice(-5)} / ${two.slice(-5)})`);
    });

    await step('recovery after a server restart: nothing lost, nothing twice', async () => {
      const before = await w.seqs();
      outage = true;
      await server.stop();
      await eventually('"Reconnecting…" in the widget', async () => /Reconnecting…/.test(await w.subtitle.innerText()), 8000);
      await sleep(1500); // long enough for a few failed reconnects with back-off
      await server.start();
      // Three agent messages at once, over HTTP, while the widget may still be reconnecting.
      const texts = ['After the restart: one', 'After the restart: two', 'After the restart: three'];
      for (const message of texts) {
        const response = await fetch(`${server.base}/api/messages`, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${agentToken}` },
          body: JSON.stringify({ chatRoomId: roomId, message }),
        });
        check(response.status === 201, `POST /api/messages answers 201 (got ${response.status}: ${await response.text()})`);
      }
      for (const text of texts) await visible(w.theirs(text), `"${text}" in the widget`, 25000);
      await eventually('the widget to be back online', async () => !/Reconnecting…/.test(await w.subtitle.innerText()), 25000);
      outage = false;
      for (const text of texts) check((await w.theirs(text).count()) === 1, `"${text}" is drawn once`);

      const history = await json(await fetch(`${server.base}/api/rooms/${roomId}/messages?limit=200`, { headers: { Authorization: `Bearer ${agentToken}` } }));
      const stored = history.messages.map((m) => m.seq);
      for (const [name, view] of [['first tab', w], ['second tab', w.tab2]]) {
        let seqs = [];
        await eventually(`the ${name} to show exactly the stored messages (stored ${stored}; drawn ${seqs})`, async () => {
          seqs = await view.seqs();
          assertOrdered(seqs, name);
          return JSON.stringify(seqs) === JSON.stringify(stored);
        }, 25000);
      }
      check(JSON.stringify(before) === JSON.stringify((await w.seqs()).slice(0, before.length)), 'the earlier messages are unchanged');
      const drawnTexts = await w.texts();
      const order = texts.map((t) => drawnTexts.findIndex((d) => d.includes(t)));
      check(order[0] < order[1] && order[1] < order[2], 'the three messages are in order');
      // The inbox recovers too.
      for (const text of texts) await visible(ib.msg(text), `"${text}" in the inbox`, 25000);
      assertOrdered(await ib.seqs(), 'inbox');

      // A reload: the same visitor, the panel open again, the same messages.
      await vPage.reload();
      await visible(w.theirs('After the restart: three'), 'the conversation after a reload');
      check(JSON.stringify(await w.seqs()) === JSON.stringify(stored), 'after a reload the widget shows exactly the stored messages');
      check(await w.panel.isVisible(), 'the panel stays open across a reload of the tab');
    });

    await step('resolve: the widget shows the resolved notice', async () => {
      await ib.button('Resolve').click();
      await visible(w.notice('This conversation was resolved by Alice.'), 'the resolved notice in the widget');
      await eventually('the widget header to say it is resolved', async () => (await w.title.innerText()) === 'Conversation resolved');
      await eventually('the inbox to show it resolved', async () => (await ib.status.innerText()) === 'Resolved');
      check(await ib.button('Resolve').isDisabled(), 'Resolve is disabled once resolved');
      await aPage.getByRole('tab', { name: /^Resolved/ }).click();
      await visible(ib.entry(roomId), 'the conversation under the Resolved tab');
      await aPage.getByRole('tab', { name: /^Open/ }).click();
      await eventually('the conversation to leave the Open tab', async () => (await ib.entry(roomId).count()) === 0);
    });

    await step('a visitor message reopens a resolved conversation; the bot answers again', async () => {
      const answers = vPage.locator('#parlor-widget .msg.theirs[data-seq][data-role="assistant"]');
      const before = await answers.count();
      await w.say('One more thing: what is Parlor?');
      await visible(w.notice('Conversation reopened'), '"Conversation reopened." in the widget');
      await eventually('the widget header to say "Assistant" again', async () => (await w.title.innerText()) === 'Assistant');
      await eventually('the bot to answer after the reopen', async () => (await answers.count()) > before, 20000);
    });

    await step('a phone-sized screen: near full-screen panel, the same visitor, Escape closes', async () => {
      const phone = await browser.newContext({
        viewport: { width: 390, height: 844 },
        deviceScaleFactor: 2,
        isMobile: true,
        hasTouch: true,
        storageState: await visitorContext.storageState(),
      });
      const page = watch(await phone.newPage(), 'widget (phone)');
      pages.push(page);
      const p = widget(page);
      await page.goto(`${server.base}/`);
      await p.open();
      const box = await p.panel.boundingBox();
      check(box && box.width >= 380 && box.height >= 800, `the panel fills the phone screen (${JSON.stringify(box)})`);
      await visible(p.theirs('Hi! How can I help you?'), 'the conversation on the phone (same visitor)');
      await page.screenshot({ path: path.join(OUT, 'widget-phone.png') });
      await p.input.press('Escape');
      await eventually('Escape to close the panel', async () => !(await p.panel.isVisible()));
      const focused = await page.evaluate(() => document.querySelector('#parlor-widget').shadowRoot.activeElement?.className);
      check(focused === 'bubble', `closing gives the focus back to the bubble (it is on ${focused})`);

      // The inbox on a phone: the list, then the conversation, then back.
      const phoneAgent = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, storageState: await agentContext.storageState() });
      const agentPage = watch(await phoneAgent.newPage(), 'inbox (phone)');
      pages.push(agentPage);
      const pi = inbox(agentPage);
      await agentPage.goto(`${server.base}/inbox`);
      // The bot has the conversation again: not in "Mine & waiting", in "Bot", no badge.
      await visible(agentPage.getByRole('tab', { name: /^Mine & waiting/, selected: true }), 'the default view');
      check(!(await pi.entry(roomId).isVisible()), 'a conversation with the bot is not in "Mine & waiting"');
      await agentPage.getByRole('tab', { name: /^Bot/ }).click();
      await visible(pi.entry(roomId), 'the conversation list on the phone');
      check(await pi.entry(roomId).locator('.unread').count() === 0, 'no unread badge on a conversation only the bot is in');
      await pi.entry(roomId).click();
      await visible(pi.msg('One more thing'), 'the conversation on the phone');
      check(!(await pi.entry(roomId).isVisible()), 'on a phone, the conversation replaces the list');
      await agentPage.getByRole('button', { name: 'Back to the conversations' }).click();
      await visible(pi.entry(roomId), 'the list again after "Back"');
      await phoneAgent.close();
    });

    // ---- The message box: 16px on a phone (no iOS zoom), a counter near the server's limit in
    // UTF-8 bytes, and a draft over it refused whole, never cut. Sends nothing.
    await step('the message box: 16px on a phone, the byte counter, an over-long draft kept whole', async () => {
      const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, storageState: await visitorContext.storageState() });
      const page = watch(await phone.newPage(), 'widget (message box)');
      pages.push(page);
      const p = widget(page);
      await page.goto(`${server.base}/`);
      await p.open();
      await visible(p.theirs('Hi! How can I help you?'), 'the conversation (joined, so the limit is known)');
      const fontSize = await p.input.evaluate((el) => getComputedStyle(el).fontSize);
      check(fontSize === '16px', `the message box is 16px on a phone (it is ${fontSize})`);
      check((await p.input.getAttribute('maxlength')) === null, 'no maxlength to cut a pasted text');
      const counter = page.locator('#parlor-widget .counter');
      await p.input.fill('é'.repeat(6000)); // 12,000 bytes: under 80 % of 16,384
      check(!(await counter.isVisible()), 'no counter far from the limit');
      await p.input.fill('é'.repeat(7000)); // 14,000 bytes
      await eventually('the counter in bytes', async () => (await counter.isVisible()) && (await counter.innerText()) === '14,000 / 16,384');
      const long = 'a'.repeat(16385);
      await p.input.fill(long);
      await eventually('the counter to say it is too long', async () => /16,385 \/ 16,384 · too long to send/.test(await counter.innerText()));
      check(await page.getByRole('button', { name: 'Send message' }).isDisabled(), 'Send is off over the limit');
      await p.input.press('Enter');
      await visible(page.locator('#parlor-widget .banner', { hasText: 'too long to send' }), 'the explanation after Enter');
      check((await p.input.inputValue()) === long, 'the draft is kept whole');
      check((await page.locator('#parlor-widget .msg.mine.pending').count()) === 0, 'nothing was sent');
      await p.input.fill('');
      check(!(await counter.isVisible()), 'the counter goes with the draft');
      await phone.close();
    });
    // ---- end of the message box block

    await step('opening the waiting conversation clears the alert; notes stay internal', async () => {
      await ib.entry(visitorB.roomId).click();
      await eventually('the title to drop the alert', async () => (await aPage.title()) === 'Parlor Inbox');
      await visible(ib.msg('Can I talk to a person?'), 'the second visitor\'s message');
      const note = aPage.getByRole('textbox', { name: 'New internal note' });
      await note.fill('Asked twice; VIP customer');
      await aPage.getByRole('button', { name: 'Add note' }).click();
      await visible(aPage.locator('#note-list .note', { hasText: 'VIP customer' }), 'the note in the notes panel');
      check((await aPage.locator('#note-list .note', { hasText: 'VIP customer' }).count()) === 1, 'the note is listed once');
      await visible(aPage.getByText('Only agents see these.'), 'the notes marked as not visible to the visitor');
      await sleep(500);
      check((await visitorB.any('VIP customer').count()) === 0, 'the visitor never sees the note');
      await ib.button('Assign to me').click();
      await visible(visitorB.notice("You're now connected to Alice"), 'the second visitor connected to Alice');
    });

    await step('transfer to another online agent, who unassigns: the visitor waits again', async () => {
      const bobContext = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      const bobPage = watch(await bobContext.newPage(), 'inbox (Bob)');
      pages.push(bobPage);
      const bob = inbox(bobPage);
      await bobPage.goto(`${server.base}/inbox`);
      await bobPage.getByLabel('Development login').fill('Bob');
      await bobPage.getByRole('button', { name: 'Sign in to the demo' }).click();
      // Alice's conversation: under "Open" for Bob, not among his own.
      await bobPage.getByRole('tab', { name: /^Open/ }).click();
      await visible(bob.entry(visitorB.roomId), 'the conversation in Bob\'s inbox');
      await bobPage.getByRole('tab', { name: /^Mine & waiting/ }).click();
      check(!(await bob.entry(visitorB.roomId).isVisible()), 'Alice\'s conversation is not in Bob\'s "Mine & waiting"');

      await ib.button('Transfer…').click();
      const select = aPage.getByLabel('Transfer to');
      await eventually('Bob among the agents to transfer to', async () => (await select.locator('option').allInnerTexts()).includes('Bob'));
      await select.selectOption({ label: 'Bob' });
      await ib.button('Transfer').click();
      await visible(visitorB.notice('transferred the conversation to Bob'), 'the transfer notice in the widget');
      await eventually('the widget header to name Bob', async () => (await visitorB.title.innerText()) === 'Bob');
      await visible(aPage.getByText('Assigned to Bob'), '"Assigned to Bob" in Alice\'s inbox');
      await visible(bob.entry(visitorB.roomId), 'the transferred conversation in Bob\'s "Mine & waiting"');

      await bob.entry(visitorB.roomId).click();
      await visible(bobPage.getByText('Assigned to you'), '"Assigned to you" in Bob\'s inbox');
      await visible(bobPage.locator('#note-list .note', { hasText: 'VIP customer' }), 'Alice\'s note in Bob\'s notes');
      await bobPage.getByRole('textbox', { name: 'New internal note' }).fill('Bob here: checking the order');
      await bobPage.getByRole('button', { name: 'Add note' }).click();
      await visible(aPage.locator('#note-list .note', { hasText: 'Bob here' }), 'Bob\'s note, live, in Alice\'s notes');
      await bob.button('Unassign').click();
      await visible(visitorB.notice('waiting for another agent'), 'the unassign notice in the widget');
      await eventually('the widget header to say it waits again', async () => (await visitorB.title.innerText()) === 'Waiting for an agent…');
      await eventually('Alice\'s inbox to show it waiting', async () => /Waiting/.test(await ib.status.innerText()));
      await bobContext.close();
    });

    await step('the stats page: the endpoint\'s figures as cards, both charts drawn, the widget\'s visitor on the site now', async () => {
      const statsPage = watch(await agentContext.newPage(), 'stats');
      pages.push(statsPage);
      await statsPage.goto(`${server.base}/stats`);
      await eventually('the figures to load', async () => Boolean(await statsPage.evaluate(() => document.body.dataset.loaded)));
      const token = await statsPage.evaluate(() => JSON.parse(localStorage.getItem('parlor:inbox:agent')).token);
      const api = await json(await fetch(`${server.base}/stats/domain/demo`, { headers: { Authorization: `Bearer ${token}` } }));
      check(api.conversations.escalated >= 2 && api.messages.byRole.agent >= 1 && api.aiReplies >= 1, `the story so far is counted: ${JSON.stringify(api.conversations)}`);
      const card = async (id) => (await statsPage.locator(`#card-${id} .value`).innerText()).replace(/[^0-9]/g, '');
      for (const [id, want] of [['conversations', api.conversations.started], ['escalated', api.conversations.escalated], ['messages', api.messages.total]]) {
        const got = await card(id);
        check(got === String(want), `card ${id}: ${got}, the endpoint says ${want}`);
      }
      // The bars are the series: one per day and figure, their values summing to the totals.
      const bars = statsPage.locator('#chart-traffic rect.bar-conversations');
      check((await bars.count()) === api.series.length, `one conversations bar per day (${await bars.count()} of ${api.series.length})`);
      const drawn = (await bars.evaluateAll((rects) => rects.map((r) => Number(r.dataset.value)))).reduce((a, b) => a + b, 0);
      check(drawn === api.conversations.started, `the conversations bars sum to ${drawn}, not ${api.conversations.started}`);
      const tallest = await statsPage.locator('#chart-messages rect.bar-messages').evaluateAll((rects) => Math.max(...rects.map((r) => r.getBBox().height)));
      check(tallest > 20, `the messages chart has visible bars (${tallest}px)`);
      // The widget reported its visitor; the list shows it with its page.
      const visitorId = await vPage.evaluate(() => JSON.parse(localStorage.getItem('parlor:visitor:demo')).userId);
      const row = statsPage.locator(`#now-list tr[data-visitor="${visitorId}"]`);
      await visible(row, 'the widget\'s visitor among those on the site now');
      check((await row.innerText()).includes(server.base), 'the visitor\'s page is listed');
      await statsPage.getByRole('button', { name: '24 hours' }).click();
      await eventually('hourly bars for the last 24 hours', async () => (await statsPage.locator('#chart-traffic rect.bar-visitors').count()) >= 24);
      await statsPage.screenshot({ path: path.join(OUT, 'stats.png'), fullPage: true });
      await statsPage.close();
    });

    await step('a long conversation: the latest 50 on load, earlier ones on request', async () => {
      for (let i = 1; i <= 55; i++) {
        const response = await fetch(`${server.base}/api/messages`, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${agentToken}` },
          body: JSON.stringify({ chatRoomId: visitorB.roomId, message: `Long conversation, line ${i}` }),
        });
        check(response.status === 201, `POST /api/messages answers 201 (got ${response.status})`);
      }
      await visitorB.page.reload();
      await visible(visitorB.theirs('Long conversation, line 55'), 'the latest message after a reload');
      const history = await json(await fetch(`${server.base}/api/rooms/${visitorB.roomId}/messages?limit=200`, { headers: { Authorization: `Bearer ${agentToken}` } }));
      const stored = history.messages.map((m) => m.seq);
      check((await visitorB.seqs()).length === 50, `a reload draws the latest 50 messages (drew ${(await visitorB.seqs()).length})`);
      await visitorB.page.getByRole('button', { name: 'Show earlier messages' }).click();
      await eventually('every message after "Show earlier messages"', async () => JSON.stringify(await visitorB.seqs()) === JSON.stringify(stored));
      check((await visitorB.page.getByRole('button', { name: 'Show earlier messages' }).count()) === 0, 'the button goes once everything is shown');
      check(await visitorB.page.getByRole('button', { name: 'Connect with Customer Support' }).last().isDisabled(), 'the old offer stays disabled');

      // The inbox pages back the same way.
      await aPage.reload();
      await ib.entry(visitorB.roomId).click();
      await visible(ib.msg('Long conversation, line 55'), 'the latest message in the inbox');
      await aPage.getByRole('button', { name: 'Load earlier messages' }).click();
      await eventually('every message in the inbox after "Load earlier messages"', async () => JSON.stringify(await ib.seqs()) === JSON.stringify(stored));
    });

    await step('the widget against a scripted socket: catch-up delta, duplicates, seq order, since', async () => {
      // The page and its token come from the real server; the WebSocket is ours, so the
      // widget meets frames a real server sends only in races (a join during a reply, a
      // repeated message, seqs arriving out of order).
      const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      const page = watch(await context.newPage(), 'widget (scripted socket)');
      pages.push(page);
      const joins = [];
      let socket = null;
      const message = (roomId, seq, text, extra = {}) => ({
        type: 'message-received', id: `m${seq}`, roomId, chatRoomId: roomId, seq, message: text, messageType: 'text',
        userId: 'assistant', userName: 'Assistant', role: 'assistant', timestamp: new Date().toISOString(), ...extra,
      });
      await page.routeWebSocket(/\/ws\?token=/, (ws) => {
        socket = ws;
        ws.onMessage((raw) => {
          const frame = JSON.parse(raw);
          if (frame.type !== 'join-room') return;
          joins.push(frame);
          const history = joins.length === 1 ? [message(frame.roomId, 1, 'First'), message(frame.roomId, 2, 'Second')] : [];
          ws.send(JSON.stringify({ type: 'room-joined', replyTo: frame.id, roomId: frame.roomId, lastSeq: joins.length === 1 ? 2 : 5, members: [], status: 'bot', assignee: null }));
          ws.send(JSON.stringify({ type: 'message-history', roomId: frame.roomId, messages: history.map(({ type, ...m }) => m), truncated: false, more: false }));
        });
      });
      const s = widget(page);
      await page.goto(`${server.base}/`);
      await s.open();
      await visible(s.theirs('Second'), 'the scripted history');
      const room = joins[0].roomId;
      check(joins[0].since === undefined, 'the first join has no `since`');
      const push = (frame) => socket.send(JSON.stringify(frame));
      const streamText = () => page.locator('#parlor-widget .streaming .text').innerText();

      push({ type: 'message-delta', roomId: room, messageId: 'ai-1', delta: 'Hello wor', index: 3, catchUp: true });
      await eventually('the catch-up text', async () => (await streamText()) === 'Hello wor');
      push({ type: 'message-delta', roomId: room, messageId: 'ai-1', delta: 'wor', index: 3 }); // already in the catch-up
      push({ type: 'message-delta', roomId: room, messageId: 'ai-1', delta: 'ld', index: 4 });
      await eventually('the streamed text to grow past the catch-up', async () => (await streamText()) === 'Hello world');
      push(message(room, 3, 'Hello world', { clientMessageId: 'ai-1' }));
      await visible(s.theirs('Hello world'), 'the stored reply');
      check((await page.locator('#parlor-widget .streaming').count()) === 0, 'the streamed text is replaced by the stored reply');
      check((await s.theirs('Hello world').count()) === 1, 'the reply is drawn once');

      push(message(room, 2, 'Second')); // a repeat
      push(message(room, 5, 'Fifth'));
      push(message(room, 4, 'Fourth')); // late
      await visible(s.theirs('Fourth'), 'the late message');
      check(JSON.stringify(await s.seqs()) === '[1,2,3,4,5]', `drawn once each, in seq order (${await s.seqs()})`);

      // The server restarts: the widget rejoins with the last seq it drew.
      socket.close({ code: 1012, reason: 'server restarting' });
      await eventually('a rejoin after the close', async () => joins.length === 2, 10000);
      check(joins[1].since === 5, `the rejoin asks for everything after seq 5 (since: ${joins[1].since})`);
      await eventually('the widget to be online again', async () => !/Reconnecting…/.test(await s.subtitle.innerText()));
      check(JSON.stringify(await s.seqs()) === '[1,2,3,4,5]', 'nothing is drawn twice after the rejoin');
      await context.close();
    });

    await step('embedded on another site: its own origin, a strict CSP, hostile CSS, the chat still works; the inbox cannot be framed', async () => {
      // A shop's page on another origin (localhost vs 127.0.0.1, another port) whose CSS
      // would wreck any widget that shared its styles, under the Content-Security-Policy
      // docs/security.md gives for embedding: no inline style or script for anyone.
      const parlorWs = server.base.replace(/^http/, 'ws');
      const shopPage = `<!doctype html><html lang="en"><head><title>Shop</title><link rel="icon" href="data:,">
        <link rel="stylesheet" href="/shop.css">
        </head><body><h1>A shop</h1>
        <script src="${server.base}/widget.js" data-domain="demo" data-color="#0f766e" async></script></body></html>`;
      const hostileCss = '* { color: red !important; font-size: 40px !important; } button { display: none !important; } div { position: static !important; }';
      const framingPage = (target) => `<!doctype html><html lang="en"><head><title>Framing</title><link rel="icon" href="data:,"></head>
        <body><iframe src="${target}" width="800" height="600"></iframe></body></html>`;
      const policy = `default-src 'none'; script-src 'self' ${server.base}; connect-src ${server.base} ${parlorWs}; style-src 'self'; img-src data:; frame-src 'self' ${server.base}`;
      const shop = http.createServer((req, res) => {
        if (req.url === '/shop.css') {
          res.writeHead(200, { 'Content-Type': 'text/css' });
          res.end(hostileCss);
          return;
        }
        res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Content-Security-Policy': policy });
        const url = new URL(req.url, 'http://shop');
        res.end(url.pathname === '/frame' ? framingPage(url.searchParams.get('target')) : shopPage);
      });
      await new Promise((resolve) => shop.listen(0, '127.0.0.1', resolve));
      try {
        const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
        // Watched: a CSP violation by the widget is a console error and fails the run.
        const page = watch(await context.newPage(), 'widget (another site)');
        pages.push(page);
        const e = widget(page);
        await page.goto(`http://localhost:${shop.address().port}/`);
        await visible(e.bubble, 'the chat bubble despite the page\'s `button { display: none }`');
        await e.open();
        const look = await e.panel.evaluate((el) => {
          const style = getComputedStyle(el);
          return { position: style.position, width: el.getBoundingClientRect().width };
        });
        check(look.position === 'fixed' && look.width < 450, `the panel keeps its own layout (${JSON.stringify(look)})`);
        const accent = await page.locator('#parlor-widget header').evaluate((el) => getComputedStyle(el).backgroundColor);
        check(accent === 'rgb(15, 118, 110)', `data-color sets the accent (${accent})`);
        await e.say('Hello from another site');
        await visible(e.mine('Hello from another site'), 'the message stored from the other site');

        // Another site frames the inbox (clickjacking its Assign and Resolve buttons):
        // Chromium refuses to show it and puts its error page in the frame instead. The
        // same frame showing the shop's own page proves the check can tell the two apart.
        const framer = await context.newPage();
        const frameUrl = async (target) => {
          await framer.goto(`http://localhost:${shop.address().port}/frame?target=${encodeURIComponent(target)}`);
          const deadline = Date.now() + 5000;
          for (;;) {
            const framed = framer.frames().find((f) => f !== framer.mainFrame());
            const url = framed ? framed.url() : '';
            if ((url && url !== 'about:blank') || Date.now() > deadline) return url;
            await framer.waitForTimeout(50);
          }
        };
        const shopFramed = await frameUrl(`http://localhost:${shop.address().port}/`);
        check(shopFramed.startsWith('http://localhost:'), `a page that allows framing shows in the frame (${shopFramed})`);
        const inboxFramed = await frameUrl(`${server.base}/inbox`);
        check(inboxFramed.startsWith('chrome-error:'), `the framed inbox is refused (${inboxFramed})`);
        await context.close();
      } finally {
        shop.close();
      }
    });

    await step('your own site: a domain without a bot, an invited agent, a reply that takes the conversation, answers from a knowledge base', async () => {
      // The customer's site, on an origin of its own.
      const sitePage = (domain) => `<!doctype html><html lang="en"><head><title>${domain}</title><link rel="icon" href="data:,"></head>
        <body><h1>${domain}</h1><script src="${own.base}/widget.js" data-domain="${domain}" async></script></body></html>`;
      const site = http.createServer((req, res) => {
        res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
        res.end(sitePage(req.url.includes('docs') ? 'docs' : 'shop'));
      });
      await new Promise((resolve) => site.listen(0, '127.0.0.1', resolve));
      const siteOrigin = `http://localhost:${site.address().port}`;
      // Parlor as the README sets it up: the shop without a bot, a docs site with help pages.
      const help = path.join(dir, 'help');
      fs.mkdirSync(help, { recursive: true });
      fs.writeFileSync(path.join(help, 'returns.md'), '# Returns\n\n## How do I return an item?\n\nSend it back within 30 days with the receipt; the refund reaches your card within five working days.\n');
      const config = path.join(dir, 'own-site.toml');
      fs.writeFileSync(config, [
        '[web]', 'dev_login = false', '',
        '[[domains]]', 'id = "shop"', 'name = "Shop"', `allowed_origins = ["${siteOrigin}"]`, '',
        '[[domains]]', 'id = "docs"', 'name = "Docs"', `allowed_origins = ["${siteOrigin}"]`,
        '[domains.bot]', `knowledge_dir = "${help}"`, '',
      ].join('\n'));
      const own = new Server(await freePort(), path.join(dir, 'own-site.db'), config);
      extraServers.push(own);
      await own.start();
      try {
        // The agent account, from the command line where the server runs.
        const added = spawnSync(BIN, ['agent', 'add', '--domain', 'shop', '--email', 'ann@shop.example', '--name', 'Ann', '--url', own.base, '--config', config, '--database', `sqlite://${own.database}`], { encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } });
        check(added.status === 0, `parlor agent add failed: ${added.stderr}`);
        const invite = (added.stdout.match(/http\S+#invite=\S+/) || [])[0];
        check(invite, `an invite link in: ${added.stdout}`);

        // A visitor on the shop's site: the widget says a person will answer, and does.
        const vContext = await browser.newContext({ viewport: { width: 1280, height: 800 } });
        const vp = watch(await vContext.newPage(), 'widget (shop)');
        pages.push(vp);
        const v = widget(vp);
        await vp.goto(`${siteOrigin}/shop`);
        await v.open();
        await eventually('the header to promise a person', async () => (await v.subtitle.innerText()).includes('A person will answer here shortly'));
        await v.say('Hello, I need help with my order');
        await visible(v.notice('Connecting you to a support agent'), 'the visitor told a person will answer');
        const room = `support-${(await vp.evaluate(() => JSON.parse(localStorage.getItem('parlor:visitor:shop')))).userId}`;

        // Ann opens her invite, chooses a password, and sees the conversation waiting.
        const aContext = await browser.newContext({ viewport: { width: 1280, height: 800 } });
        const ap = watch(await aContext.newPage(), 'inbox (shop)');
        pages.push(ap);
        const a = inbox(ap);
        await ap.goto(invite);
        await ap.getByLabel('New password').fill('ann has a long password');
        await ap.getByLabel('Repeat it').fill('ann has a long password');
        await ap.getByRole('button', { name: 'Set password and sign in' }).click();
        await visible(ap.getByText('Signed in as Ann'), 'Ann signed in to the inbox');
        check(!ap.url().includes('invite='), 'the invite is gone from the address bar');
        const entry = a.entry(room);
        await visible(entry, 'the shop visitor\'s conversation in Ann\'s inbox');
        check((await entry.locator('.pill').innerText()) === 'Waiting', 'it is waiting');
        await entry.click();
        await visible(a.msg('Hello, I need help with my order'), 'the visitor\'s message in the inbox');
        // She answers without pressing "Assign to me": the conversation is hers.
        await a.reply.click();
        await a.reply.pressSequentially('Hi, I am Ann. What is the order number?', { delay: 10 });
        await a.reply.press('Enter');
        await visible(v.notice("You're now connected to Ann"), 'the visitor sees Ann join');
        check(!(await v.notice("You're now connected to Ann").innerText()).includes('✅'), 'the widget\'s notice has its icon, not an emoji');
        await visible(v.theirs('What is the order number?'), 'Ann\'s answer in the widget');
        await eventually('the widget header to name Ann', async () => (await v.title.innerText()) === 'Ann');
        await visible(ap.getByText('Assigned to you'), '"Assigned to you" in the inbox');

        // Signed out and in again with e-mail and password: the conversation is still hers.
        await ap.getByRole('button', { name: 'Sign out' }).click();
        await ap.getByLabel('E-mail').fill('Ann@Shop.example');
        await ap.getByLabel('Password', { exact: true }).fill('ann has a long password');
        await ap.getByRole('button', { name: 'Sign in', exact: true }).click();
        await visible(ap.getByText('Signed in as Ann'), 'Ann signed in again');
        await visible(a.entry(room), 'the conversation after signing in again');

        // Notes need a conversation; the search finds one by an older message's words.
        check(await ap.getByRole('textbox', { name: 'New internal note' }).isDisabled(), 'no note without a conversation');
        const searchBox = ap.getByRole('searchbox', { name: 'Search conversations' });
        await searchBox.fill('help with my ORDER');
        await visible(a.entry(room), 'the conversation found by the visitor\'s first message');
        await searchBox.fill('words nobody wrote');
        await visible(ap.getByText('No conversation matches'), 'an empty search says so');
        await searchBox.fill('');
        await a.entry(room).click();
        // Beside it: where the visitor is, as the widget and the browser told the server.
        await visible(ap.locator('#visitor-card'), 'the visitor\'s details beside the conversation');
        const facts = await ap.locator('#visitor-facts').innerText();
        check(facts.includes('Chrome on Linux') && facts.includes('shop'), `the visitor's browser and page (it reads "${facts}")`);
        const assigned = ap.locator('#log .msg.notice[data-event="assign"]');
        await visible(assigned, 'the assignment notice in the inbox');
        check(await assigned.first().locator('svg.icon').count() === 1, 'system notices carry an SVG icon');
        check(!(await assigned.first().innerText()).includes('✅'), 'and no emoji');

        // Resolved: read-only until reopened.
        await a.button('Resolve').click();
        await visible(ap.getByText('This conversation is resolved.'), 'the resolved conversation is read-only');
        check(!(await a.reply.isVisible()), 'no reply box in a resolved conversation');
        await a.button('Reopen').click();
        await visible(ap.getByText('Assigned to you'), 'reopened and assigned to Ann');
        await visible(a.reply, 'the reply box is back');

        // The docs site's assistant answers from its help page, with the source under it.
        const dp = watch(await vContext.newPage(), 'widget (docs)');
        pages.push(dp);
        const d = widget(dp);
        await dp.goto(`${siteOrigin}/docs`);
        await d.open();
        await d.say('Can I return an item I bought?');
        await visible(d.theirs('within 30 days'), 'the answer from the right passage');
        await visible(dp.locator('#parlor-widget').getByText('How do I return an item?'), 'the answer\'s source under it');
        check(!(await d.theirs('within 30 days').innerText()).includes('Source: returns.md'), 'no file name in the answer\'s text');
        await aContext.close();
        await vContext.close();
      } finally {
        site.close();
        await own.stop();
      }
    });

    await step('a guided session on the demo page: one question at a time, a wrong date asked again, a reload resumes, the document at the end', async () => {
      const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      const page = watch(await context.newPage(), 'guided');
      pages.push(page);
      await page.goto(`${server.base}/`);
      const answer = async (text) => {
        await page.locator('#guided-answer').fill(text);
        await page.getByRole('button', { name: 'Answer' }).click();
      };
      const question = page.locator('#guided-question');
      await page.getByRole('button', { name: 'Draft a mutual NDA' }).click();
      await visible(question.filter({ hasText: 'full legal name of the first party' }), 'the first question');
      check((await page.locator('#guided-help').innerText()).includes('Acme Ltd'), 'the question\'s hint is shown');
      await answer('Acme Ltd');
      await visible(question.filter({ hasText: 'second party' }), 'the second question');
      await answer('Globex GmbH');
      await visible(question.filter({ hasText: 'share confidential information' }), 'the third question');

      // Reload: the panel reconnects by itself and shows what was said.
      await page.reload();
      await visible(question.filter({ hasText: 'share confidential information' }), 'the same question after a reload');
      const said = await page.locator('#guided-log li.user').allInnerTexts();
      check(JSON.stringify(said) === JSON.stringify(['Acme Ltd', 'Globex GmbH']), `the answers come back after a reload (${JSON.stringify(said)})`);
      check((await page.locator('#guided-log li.assistant', { hasText: 'share confidential information' }).count()) === 1, 'the pending question is shown once');

      await answer('To evaluate a possible partnership.');
      await visible(question.filter({ hasText: 'From which date' }), 'the date question');
      await answer('next Tuesday');
      await visible(question.filter({ hasText: 'YYYY-MM-DD' }), 'the date question again, with the reason');
      for (const text of ['2027-01-31', '3', 'Ireland', 'legal@acme.example']) await answer(text);
      const documentText = page.locator('#guided-document');
      await visible(documentText, 'the document');
      const text = await documentText.innerText();
      check(text.includes('**Acme Ltd**') && text.includes('Ireland'), `the document holds the answers (${text.slice(0, 120)}…)`);
      check(!(await page.locator('#guided-form').isVisible()), 'the form is gone once the session is complete');
      await context.close();
    });

    await step('a server with the development login off: the inbox offers e-mail sign-in and the token form only', async () => {
      const config = path.join(dir, 'no-dev-login.toml');
      fs.writeFileSync(config, '[web]\ndev_login = false\n');
      const locked = new Server(await freePort(), path.join(dir, 'locked.db'), config);
      extraServers.push(locked);
      await locked.start();
      const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      // Both sign-ins fail on purpose: 401 for the unknown account, then for the bad token.
      const page = watch(await context.newPage(), 'inbox (dev login off)', /status of 401/);
      pages.push(page);
      await page.goto(`${locked.base}/inbox`);
      await page.getByLabel('E-mail').fill('mallory@example.com');
      await page.getByLabel('Password', { exact: true }).fill('not the password');
      await page.getByRole('button', { name: 'Sign in', exact: true }).click();
      await visible(page.getByText('Wrong e-mail address or password.'), 'a refused sign-in explained');
      await page.getByText('Other ways to sign in').click();
      check(!(await page.getByLabel('Development login').isVisible()), 'the development login is not offered');
      await visible(page.getByRole('textbox', { name: 'Agent token' }), 'the agent token form');
      await page.getByRole('textbox', { name: 'Agent token' }).fill('not-a-token');
      await page.getByRole('button', { name: 'Sign in with token' }).click();
      await visible(page.getByText('This token was refused'), 'a refused token explained');
      await context.close();
      await locked.stop();
    });

    check(consoleProblems.length === 0, `the pages logged errors:\n  ${consoleProblems.join('\n  ')}`);
    console.log(`\n${steps.length} passed, 0 failed`);
    clearTimeout(overall);
    await cleanup();
    process.exit(0);
  } catch (error) {
    console.log(`not ok ${steps.length + 1} - ${error instanceof Failure ? error.message : error.stack || error}`);
    for (const [i, page] of pages.entries()) {
      await page.screenshot({ path: path.join(OUT, `failure-${i}.png`) }).catch(() => {});
    }
    if (consoleProblems.length) console.log(`page errors:\n  ${consoleProblems.join('\n  ')}`);
    console.log(`screenshots of every page: ${OUT}/failure-*.png`);
    console.log(`--- server log (last lines) ---\n${server.tail()}`);
    console.log(`\n${steps.length} passed, 1 failed`);
    clearTimeout(overall);
    await cleanup();
    process.exit(1);
  }
}

main();
