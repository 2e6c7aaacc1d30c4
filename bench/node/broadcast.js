#!/usr/bin/env node
// Node.js baseline for `parlor-bench fanout`: an in-memory broadcast server on
// the `ws` package that speaks the minimal subset of Parlor's WebSocket
// protocol the benchmark uses, so the same client runs against both.
//
//   join-room     -> room-joined (replyTo, lastSeq) + empty message-history
//   send-message  -> message-received (per-room seq) to every member, sender
//                    included, then message-ack to the sender
//   leave-room    -> room-left
//   ping          -> pong
//   anything else -> error
//
// Nothing is persisted and there is no authentication, rate limiting or
// slow-consumer handling: it is a lower bound on the work a broadcast costs
// in Node, not a Parlor replacement.
//
// Usage: PORT=18081 [HOST=127.0.0.1] node broadcast.js

'use strict';

const { WebSocketServer } = require('ws');
const { handleFrame, messageReceived, now, visitorId } = require('./protocol');

const PORT = Number.parseInt(process.env.PORT || '18081', 10);
const HOST = process.env.HOST || '127.0.0.1';

/** roomId -> { seq: number, members: Set<WebSocket> } */
const rooms = new Map();

function room(roomId) {
  let r = rooms.get(roomId);
  if (!r) {
    r = { seq: 0, members: new Set() };
    rooms.set(roomId, r);
  }
  return r;
}

function reply(ws, frame) {
  ws.send(JSON.stringify(frame));
}

function error(ws, code, message, replyTo) {
  const frame = { type: 'error', code, message };
  if (replyTo !== undefined) frame.replyTo = replyTo;
  reply(ws, frame);
}

function join(ws, roomId, replyTo) {
  const r = room(roomId);
  r.members.add(ws);
  ws.rooms.add(roomId);
  const joined = { type: 'room-joined', roomId, lastSeq: r.seq, timestamp: now() };
  if (replyTo !== undefined) joined.replyTo = replyTo;
  reply(ws, joined);
  reply(ws, { type: 'message-history', roomId, messages: [] });
}

function leave(ws, roomId) {
  const r = rooms.get(roomId);
  if (r) {
    r.members.delete(ws);
    if (r.members.size === 0 && r.seq === 0) rooms.delete(roomId);
  }
  ws.rooms.delete(roomId);
}

function sendMessage(ws, frame) {
  const { roomId, message, clientMessageId, id } = frame;
  if (typeof roomId !== 'string' || typeof message !== 'string') {
    error(ws, 'bad_request', 'send-message needs roomId and message strings', id);
    return;
  }
  if (!ws.rooms.has(roomId)) {
    error(ws, 'not_joined', `join ${roomId} first`, id);
    return;
  }
  const r = room(roomId);
  r.seq += 1;
  const received = messageReceived(roomId, r.seq, message, ws.userId, clientMessageId);
  const messageId = received.id;
  // Serialise once and hand the same buffer to every member.
  const bytes = Buffer.from(JSON.stringify(received));
  for (const member of r.members) {
    member.send(bytes, { binary: false });
  }
  const ack = { type: 'message-ack', id: messageId, seq: r.seq, roomId };
  if (id !== undefined) ack.replyTo = id;
  if (clientMessageId !== undefined) ack.clientMessageId = clientMessageId;
  reply(ws, ack);
}

// What the client frames do here (decoded and dispatched by protocol.js).
const HANDLERS = { join, leave: leave, send: sendMessage, reply, error };

function onMessage(ws, data, isBinary) {
  if (isBinary) {
    error(ws, 'bad_request', 'binary frames are not supported');
    return;
  }
  handleFrame(ws, data.toString(), HANDLERS);
}

const wss = new WebSocketServer({
  host: HOST,
  port: PORT,
  path: '/ws',
  perMessageDeflate: false,
  clientTracking: true,
  maxPayload: 1 << 20,
});

wss.on('connection', (ws, req) => {
  ws.userId = visitorId();
  ws.rooms = new Set();
  ws.on('message', (data, isBinary) => onMessage(ws, data, isBinary));
  ws.on('close', () => {
    for (const roomId of [...ws.rooms]) leave(ws, roomId);
  });
  ws.on('error', () => {});
  const autoJoin = new URL(req.url || '/ws', 'http://localhost').searchParams.get('roomId');
  if (autoJoin) join(ws, autoJoin, undefined);
});

wss.on('listening', () => {
  console.log(`node ws baseline listening on ws://${HOST}:${PORT}/ws (pid ${process.pid})`);
});

wss.on('error', (err) => {
  console.error(`node ws baseline: ${err.message}`);
  process.exit(1);
});

function shutdown() {
  for (const client of wss.clients) client.terminate();
  wss.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
