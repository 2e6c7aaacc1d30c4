'use strict';
// The client frames both Node baselines (broadcast.js on `ws`, uws.js on
// uWebSockets.js) accept, decoded and dispatched in one place so the two speak
// exactly the same protocol subset. Each server supplies what the frames do.

/** The time as Parlor writes it (ISO 8601, UTC). */
function now() {
  return new Date().toISOString();
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

module.exports = { handleFrame, now };
