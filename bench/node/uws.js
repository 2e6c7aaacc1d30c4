#!/usr/bin/env node
// uWebSockets.js baseline for `parlor-bench idle` and `fanout`: the same
// in-memory broadcast server as broadcast.js (same path, query, frames and
// JSON shapes), written on uWebSockets.js the way a uWS user would write it:
// each room is a pub/sub topic, a member subscribes to it, and a message is
// published once to the topic, which uWS fans out to the subscribers itself.
//
//   join-room     -> room-joined (replyTo, lastSeq) + empty message-history
//   send-message  -> message-received (per-room seq) to every member, sender
//                    included, then message-ack to the sender
//   leave-room    -> room-left
//   ping          -> pong
//   anything else -> error
//
// Like broadcast.js: nothing is persisted; no authentication, rate limiting,
// presence or slow-consumer handling (a member's send buffer may grow to
// MAX_BACKPRESSURE, far beyond what a run fills, and nobody is dropped or
// closed for being slow); no idle timeout or server pings; no per-message
// deflate; frames of up to 1 MiB. `GET /ws?roomId=R` joins R on open.
//
// It loads the native uWS add-on shipped in @trufflesuite/uws-js-unofficial
// for this Node.js (binaries for Node 16, 18 and 20 on Linux x64/arm64) and
// refuses to start without it, rather than measure the package's fallback,
// which is built on `ws`.
//
// Usage: PORT=18082 [HOST=127.0.0.1] node uws.js

'use strict';

const path = require('node:path');
const { handleFrame, messageReceived, now, visitorId } = require('./protocol');

const PORT = Number.parseInt(process.env.PORT || '18082', 10);
const HOST = process.env.HOST || '127.0.0.1';
const MAX_BACKPRESSURE = 1024 * 1024 * 1024;

function loadNative() {
  const pkg = path.dirname(require.resolve('@trufflesuite/uws-js-unofficial/package.json'));
  const file = path.join(
    pkg,
    'binaries',
    `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`,
  );
  try {
    return require(file);
  } catch (err) {
    console.error(
      `uWS baseline: no native uWebSockets.js for Node ${process.version} ` +
        `(${process.platform}-${process.arch}, ABI ${process.versions.modules}): ${err.message}`,
    );
    process.exit(1);
  }
}

const uWS = loadNative();

/** roomId -> { seq: number, members: number } */
const rooms = new Map();
let listenSocket = null;

function topic(roomId) {
  return `room/${roomId}`;
}

function room(roomId) {
  let r = rooms.get(roomId);
  if (!r) {
    r = { seq: 0, members: 0 };
    rooms.set(roomId, r);
  }
  return r;
}

function reply(ws, frame) {
  ws.send(JSON.stringify(frame), false);
}

function error(ws, code, message, replyTo) {
  const frame = { type: 'error', code, message };
  if (replyTo !== undefined) frame.replyTo = replyTo;
  reply(ws, frame);
}

function join(ws, roomId, replyTo) {
  const user = ws.getUserData();
  const r = room(roomId);
  if (!user.rooms.has(roomId)) {
    user.rooms.add(roomId);
    r.members += 1;
    ws.subscribe(topic(roomId));
  }
  const joined = { type: 'room-joined', roomId, lastSeq: r.seq, timestamp: now() };
  if (replyTo !== undefined) joined.replyTo = replyTo;
  reply(ws, joined);
  reply(ws, { type: 'message-history', roomId, messages: [] });
}

// `unsubscribe` is false when uWS has already dropped the closed socket's
// subscriptions itself.
function leave(ws, roomId, unsubscribe) {
  const user = ws.getUserData();
  if (!user.rooms.delete(roomId)) return;
  if (unsubscribe) ws.unsubscribe(topic(roomId));
  const r = rooms.get(roomId);
  if (r) {
    r.members -= 1;
    if (r.members === 0 && r.seq === 0) rooms.delete(roomId);
  }
}

function sendMessage(ws, frame) {
  const { roomId, message, clientMessageId, id } = frame;
  if (typeof roomId !== 'string' || typeof message !== 'string') {
    error(ws, 'bad_request', 'send-message needs roomId and message strings', id);
    return;
  }
  const user = ws.getUserData();
  if (!user.rooms.has(roomId)) {
    error(ws, 'not_joined', `join ${roomId} first`, id);
    return;
  }
  const r = room(roomId);
  r.seq += 1;
  const received = messageReceived(roomId, r.seq, message, user.userId, clientMessageId);
  const messageId = received.id;
  // The app's publish reaches every subscriber, the sender included (the
  // socket's own publish would skip the sender).
  app.publish(topic(roomId), JSON.stringify(received), false);
  const ack = { type: 'message-ack', id: messageId, seq: r.seq, roomId };
  if (id !== undefined) ack.replyTo = id;
  if (clientMessageId !== undefined) ack.clientMessageId = clientMessageId;
  reply(ws, ack);
}

// What the client frames do here (decoded and dispatched by protocol.js).
const HANDLERS = { join, leave: (w, roomId) => leave(w, roomId, true), send: sendMessage, reply, error };

function onMessage(ws, data, isBinary) {
  if (isBinary) {
    error(ws, 'bad_request', 'binary frames are not supported');
    return;
  }
  // `data` is only valid during this call: it is decoded at once.
  handleFrame(ws, Buffer.from(data).toString('utf8'), HANDLERS);
}

const app = uWS.App();

app.ws('/ws', {
  compression: uWS.DISABLED,
  maxPayloadLength: 1024 * 1024,
  maxBackpressure: MAX_BACKPRESSURE,
  closeOnBackpressureLimit: false,
  idleTimeout: 0,
  sendPingsAutomatically: false,
  upgrade: (res, req, context) => {
    // Everything from `req` must be read before returning or upgrading.
    const autoJoin = req.getQuery('roomId') || '';
    res.upgrade(
      { userId: visitorId(), rooms: new Set(), autoJoin },
      req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'),
      context,
    );
  },
  open: (ws) => {
    const user = ws.getUserData();
    if (user.autoJoin) join(ws, user.autoJoin, undefined);
    user.autoJoin = undefined;
  },
  message: onMessage,
  close: (ws) => {
    const user = ws.getUserData();
    for (const roomId of [...user.rooms]) leave(ws, roomId, false);
  },
});

// Any other request gets 400, as an upgrade to another path does from broadcast.js.
app.any('/*', (res) => {
  res.writeStatus('400 Bad Request').end();
});

app.listen(HOST, PORT, (socket) => {
  if (!socket) {
    console.error(`uWS baseline: cannot listen on ${HOST}:${PORT}`);
    process.exit(1);
  }
  listenSocket = socket;
  console.log(`uWS baseline listening on ws://${HOST}:${PORT}/ws (pid ${process.pid})`);
});

// Stop listening and exit; the kernel closes the remaining connections.
function shutdown() {
  if (listenSocket) uWS.us_listen_socket_close(listenSocket);
  listenSocket = null;
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
