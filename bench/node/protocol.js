'use strict';
// The client frames both Node baselines (broadcast.js on `ws`, uws.js on
// uWebSockets.js) accept, decoded and dispatched in one place so the two speak
// exactly the same protocol subset. Each server supplies what the frames do.

const crypto = require('crypto');

/** The time as Parlor writes it (ISO 8601, UTC). */
function now() {
  return new Date().toISOString();
}

/**
 * A user id as Parlor gives an anonymous visitor: `v_` and 16 hex digits. The
 * baselines' frames carry ids as long as Parlor's, so that every server writes
 * the same bytes per delivery and the figures compare servers, not formats.
 */
function visitorId() {
  return `v_${crypto.randomBytes(8).toString('hex')}`;
}

/**
 * `message-received` for a visitor's text message, with the fields Parlor's has,
 * in its order: a message id as long as Parlor's (a UUID), `messageType`, the
 * visitor's name as Parlor defaults it.
 */
function messageReceived(roomId, seq, message, userId, clientMessageId) {
  const frame = {
    type: 'message-received',
    id: crypto.randomUUID(),
    roomId,
    chatRoomId: roomId,
    seq,
    message,
    messageType: 'text',
    userId,
    userName: 'Visitor',
    role: 'visitor',
    timestamp: now(),
  };
  if (clientMessageId !== undefined) frame.clientMessageId = clientMessageId;
  return frame;
}

/**
 * Decodes one text frame from `ws` and calls the matching handler of `h`:
 * `join(ws, roomId, id)`, `leave(ws, roomId)`, `send(ws, frame)`, and
 * `reply(ws, frame)` / `error(ws, code, message, replyTo)` for answers.
 */
function handleFrame(ws, text, h) {
  let frame;
  try {
    frame = JSON.parse(text);
  } catch {
    h.error(ws, 'bad_request', 'frame is not JSON');
    return;
  }
  if (frame === null || typeof frame !== 'object') {
    h.error(ws, 'bad_request', 'frame is not an object');
    return;
  }
  switch (frame.type) {
    case 'join-room':
      if (typeof frame.roomId !== 'string' || frame.roomId === '') {
        h.error(ws, 'bad_request', 'join-room needs a roomId', frame.id);
      } else {
        h.join(ws, frame.roomId, frame.id);
      }
      break;
    case 'leave-room':
      if (typeof frame.roomId === 'string') h.leave(ws, frame.roomId);
      h.reply(ws, { type: 'room-left', roomId: frame.roomId, replyTo: frame.id });
      break;
    case 'send-message':
      h.send(ws, frame);
      break;
    case 'ping':
      h.reply(ws, { type: 'pong', timestamp: now() });
      break;
    default:
      h.error(ws, 'unknown_type', `unsupported frame type ${JSON.stringify(frame.type)}`, frame.id);
  }
}

module.exports = { handleFrame, messageReceived, now, visitorId };
