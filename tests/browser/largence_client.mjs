// A replica of the Largence web app's guided-session client (seed 003), written from the
// seed's message types alone, run against Parlor's `/chat` to show that app works with
// Parlor unchanged.
//
//   LARGENCE_SERVER_URL=http://127.0.0.1:8080 LARGENCE_TOKEN=<owner's JWT> \
//   LARGENCE_OTHER_TOKEN=<another user's JWT> LARGENCE_TEMPLATE_ID=mutual-nda \
//   node tests/browser/largence_client.mjs
//
// The client connects with `token` and `templateId` in the query, keeps the `sessionId` the
// server names, renders `session_resumed.history` as its transcript, answers each
// `next_question` with a `user_message`, and reconnects to the same session. The scenario:
// answer two questions, close the socket halfway, reconnect and check `session_resumed`
// brings back the same session with both answers in order, answer the rest until
// `session_complete`, check the close is 1000, then read the document over HTTP as its
// owner (200, the same id) and as another user (404). Every wait is bounded (10 s). The
// script exits 0 and prints `RESULT {json}` (the session id, the document id, the answers
// sent and the owner's view of the document) as its last line, or prints what differed and
// exits 1. It talks only to LARGENCE_SERVER_URL.
//
// `cargo test --test largence_client` runs it against a fake AI service
// (tests/largence_client.rs); it needs `npm ci --prefix tests/browser` for `ws`.

import WebSocket from 'ws';

/** How long any single wait may take. */
const WAIT_MS = 10_000;

/** The whole scenario's budget, in case a step's own bound does not fire. */
const TOTAL_MS = 60_000;

/** Answers given in order; a longer session gets numbered ones after these. */
const ANSWERS = [
  'Acme Ltd and Globex GmbH',
  'To evaluate a possible partnership.',
  '2027-01-31',
  '3 years, under the law of Ireland',
];

/** A mismatch: the scenario stops and says what was expected and what came. */
class Mismatch extends Error {}

function check(ok, message) {
  if (!ok) throw new Mismatch(message);
}

function same(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  check(a === e, `${what}: expected ${e}, got ${a}`);
}

/** `promise`, or a Mismatch naming `what` after `ms`. */
function bounded(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Mismatch(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------
// The client

/**
 * One user's guided session of one template, as the web app holds it: the socket, the
 * session id, the transcript and the question waiting for an answer. Frames are queued as
 * they arrive, so none is missed between two waits.
 */
class LargenceClient {
  /** `serverUrl`: http(s):// or ws(s):// base of the server. */
  constructor(serverUrl, token, templateId) {
    const base = new URL(serverUrl);
    base.protocol = base.protocol === 'https:' || base.protocol === 'wss:' ? 'wss:' : 'ws:';
    const url = new URL('/chat', base);
    url.searchParams.set('token', token);
    url.searchParams.set('templateId', templateId);
    this.url = url.toString();
    this.sessionId = null;
    /** The conversation as shown: `{role, content}` turns. */
    this.transcript = [];
    /** The question waiting for an answer: `{id, text}`. */
    this.question = null;
    this.socket = null;
    this.frames = [];
    this.waiters = [];
    this.closeCode = null;
    this.closeWaiters = [];
  }

  /** Opens the socket; resolves once it is open (the server's first frames are queued). */
  connect() {
    this.frames = [];
    this.closeCode = null;
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.on('message', (data, isBinary) => {
      if (isBinary) return;
      let frame;
      try {
        frame = JSON.parse(data.toString());
      } catch {
        return;
      }
      this.frames.push(frame);
      this.wake();
    });
    socket.on('close', (code) => {
      this.closeCode = code;
      for (const resolve of this.closeWaiters.splice(0)) resolve(code);
      this.wake();
    });
    return bounded(
      new Promise((resolve, reject) => {
        socket.once('open', resolve);
        socket.once('unexpected-response', (_req, res) => {
          let body = '';
          res.on('data', (chunk) => (body += chunk));
          res.on('end', () =>
            reject(new Mismatch(`the upgrade was refused: ${res.statusCode} ${body}`)),
          );
        });
        socket.once('error', (e) => reject(new Mismatch(`cannot connect: ${e.message}`)));
      }),
      `the connection to ${this.url.replace(/token=[^&]*/, 'token=…')}`,
    );
  }

  /** Closes the socket as a tab being closed does; resolves when it is closed. */
  disconnect() {
    const socket = this.socket;
    if (!socket || socket.readyState === WebSocket.CLOSED) return Promise.resolve();
    const closed = new Promise((resolve) => socket.once('close', resolve));
    socket.close(1000);
    return bounded(closed, 'the socket to close');
  }

  /** A new socket for the same token and template: the server resumes the session. */
  async reconnect() {
    await this.disconnect();
    await this.connect();
  }

  wake() {
    for (const resolve of this.waiters.splice(0)) resolve();
  }

  /** The next server frame, applied to the client's state. */
  async next(what) {
    const deadline = Date.now() + WAIT_MS;
    while (this.frames.length === 0) {
      if (this.closeCode !== null) {
        throw new Mismatch(`the connection closed (${this.closeCode}) while waiting for ${what}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Mismatch(`timed out after ${WAIT_MS} ms waiting for ${what}`);
      await bounded(new Promise((resolve) => this.waiters.push(resolve)), what, left);
    }
    const frame = this.frames.shift();
    this.apply(frame);
    return frame;
  }

  /** The next frame, which must be of `type` (an `error` frame is a mismatch). */
  async expect(type) {
    const frame = await this.next(`\`${type}\``);
    if (frame.type === 'error') {
      throw new Mismatch(`expected \`${type}\`, got error ${frame.code}: ${frame.message}`);
    }
    same(frame.type, type, 'frame type');
    return frame;
  }

  /** What the web app does with each frame. */
  apply(frame) {
    switch (frame.type) {
      case 'next_question':
        this.sessionId = frame.sessionId;
        this.question = frame.question;
        if (this.transcript.at(-1)?.content !== frame.question.text) {
          this.transcript.push({ role: 'assistant', content: frame.question.text });
        }
        break;
      case 'session_resumed':
        this.sessionId = frame.sessionId;
        this.transcript = frame.history.map((t) => ({ role: t.role, content: t.content }));
        break;
      case 'session_complete':
        this.sessionId = frame.sessionId;
        this.question = null;
        this.documentId = frame.documentId;
        break;
      default:
        break;
    }
  }

  /** Sends an answer to the question shown. */
  answer(content) {
    this.socket.send(JSON.stringify({ type: 'user_message', content }));
    this.transcript.push({ role: 'user', content });
    this.question = null;
  }

  /** The close code, once the server closes (after `session_complete`). */
  closed() {
    if (this.closeCode !== null) return Promise.resolve(this.closeCode);
    return bounded(new Promise((resolve) => this.closeWaiters.push(resolve)), 'the close');
  }

  /** The transcript as the page shows it. */
  render() {
    return this.transcript.map((t) => `  ${t.role === 'user' ? 'you' : 'assistant'}: ${t.content}`).join('\n');
  }
}

/** `GET {serverUrl}{path}` with a bearer token: the status and the JSON body (or null). */
async function getJson(serverUrl, path, token) {
  const base = new URL(serverUrl);
  base.protocol = base.protocol === 'wss:' || base.protocol === 'https:' ? 'https:' : 'http:';
  let res;
  try {
    res = await fetch(new URL(path, base), {
      headers: { authorization: `Bearer ${token}` },
      signal: AbortSignal.timeout(WAIT_MS),
    });
  } catch (e) {
    throw new Mismatch(`GET ${path} failed: ${e.message}`);
  }
  const text = await bounded(res.text(), `the body of GET ${path}`);
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  return { status: res.status, body };
}

// ---------------------------------------------------------------------------------------
// The scenario

function env(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`Set ${name}. Needed: LARGENCE_SERVER_URL, LARGENCE_TOKEN, LARGENCE_OTHER_TOKEN, LARGENCE_TEMPLATE_ID.`);
    process.exit(2);
  }
  return value;
}

function answerFor(index) {
  return ANSWERS[index] ?? `Answer ${index + 1}`;
}

async function main() {
  const server = env('LARGENCE_SERVER_URL');
  const token = env('LARGENCE_TOKEN');
  const otherToken = env('LARGENCE_OTHER_TOKEN');
  const templateId = env('LARGENCE_TEMPLATE_ID');

  const client = new LargenceClient(server, token, templateId);
  const sent = [];
  const asked = [];

  // A new session: its first question at once.
  await client.connect();
  let frame = await client.expect('next_question');
  check(typeof frame.sessionId === 'string' && frame.sessionId !== '', `no sessionId in ${JSON.stringify(frame)}`);
  const sessionId = client.sessionId;
  asked.push(frame.question.text);

  // Two answers, each followed by the next question of the same session.
  for (let i = 0; i < 2; i += 1) {
    sent.push(answerFor(i));
    client.answer(answerFor(i));
    frame = await client.expect('next_question');
    same(frame.sessionId, sessionId, 'sessionId of a next_question');
    asked.push(frame.question.text);
  }
  const waiting = client.question;

  // Halfway: the tab is closed, then opened again.
  await client.reconnect();
  frame = await client.expect('session_resumed');
  same(frame.sessionId, sessionId, 'sessionId of session_resumed');
  check(Array.isArray(frame.history), `session_resumed has no history: ${JSON.stringify(frame)}`);
  same(
    frame.history.filter((t) => t.role === 'user').map((t) => t.content),
    sent,
    'the answers in session_resumed.history',
  );
  same(
    frame.history.filter((t) => t.role === 'assistant').map((t) => t.content),
    asked,
    'the questions in session_resumed.history',
  );
  console.log(`resumed ${sessionId}:\n${client.render()}`);
  frame = await client.expect('next_question');
  same(frame.sessionId, sessionId, 'sessionId of the pending question');
  same(frame.question, waiting, 'the question asked again after resuming');

  // The rest, until the end.
  for (;;) {
    const content = answerFor(sent.length);
    sent.push(content);
    client.answer(content);
    frame = await client.next('the next question or the end');
    if (frame.type === 'session_complete') break;
    if (frame.type === 'error') throw new Mismatch(`error ${frame.code}: ${frame.message}`);
    same(frame.type, 'next_question', 'frame type');
    same(frame.sessionId, sessionId, 'sessionId of a next_question');
    asked.push(frame.question.text);
    check(sent.length < 100, 'the session did not end after 100 answers');
  }
  same(frame.sessionId, sessionId, 'sessionId of session_complete');
  check(
    typeof frame.documentId === 'string' && frame.documentId !== '',
    `session_complete has no documentId: ${JSON.stringify(frame)}`,
  );
  const documentId = frame.documentId;
  same(await client.closed(), 1000, 'the close code after session_complete');
  console.log(`complete ${sessionId}, document ${documentId}:\n${client.render()}`);

  // The owner reads the document; another user is told there is none.
  const path = `/api/documents/${encodeURIComponent(documentId)}`;
  const mine = await getJson(server, path, token);
  same(mine.status, 200, `the owner's GET ${path} (${JSON.stringify(mine.body)})`);
  same(mine.body?.id, documentId, "the id of the owner's document");
  same(mine.body?.sessionId, sessionId, "the sessionId of the owner's document");
  const theirs = await getJson(server, path, otherToken);
  same(theirs.status, 404, `another user's GET ${path} (${JSON.stringify(theirs.body)})`);

  console.log(`RESULT ${JSON.stringify({ sessionId, documentId, answers: sent, questions: asked, document: mine.body })}`);
}

const overall = setTimeout(() => {
  console.error(`FAIL: the scenario did not finish within ${TOTAL_MS} ms`);
  process.exit(1);
}, TOTAL_MS);
overall.unref();

try {
  await main();
  process.exit(0);
} catch (e) {
  console.error(e instanceof Mismatch ? `FAIL: ${e.message}` : `FAIL: ${e.stack ?? e}`);
  process.exit(1);
}
