// A pusher-js 8 client of Parlor's Pusher endpoint (`/app/{key}`), with the `pusher` server
// SDK and Laravel Echo beside it, as an app would run them. Driven by tests/pusher.rs: it
// prints one JSON line per thing that happens, takes one JSON command per stdin line, and
// exits when stdin closes.
//
// Channel and user authorisations come from the app's own auth endpoint, a small HTTP
// server here that signs with the SDK's `authorizeChannel` / `authenticateUser` (the
// presence member and the signed-in user are USER_ID) — or, with PARLOR_TOKEN set, from
// Parlor's own `POST /pusher/auth` with that token as the bearer.
//
// Environment: PARLOR_PORT, APP_ID, APP_KEY, APP_SECRET (what the app signs with),
// USER_ID, CHANNELS (comma-separated, subscribed at start), PARLOR_TOKEN (optional).
//
// Commands ({"do": …}):
//   subscribe {channel} · unsubscribe {channel} · client {channel, event, data}
//   signin · echo {channel, event}
//   trigger {channels, event, data, exclude_me?} · batch {batch} · get {path, params}
//   send_to_user {user, event, data} · terminate {user}
// Each SDK call prints {"event": "reply", "of": do, "status", "body"}.
import http from "node:http";
import Pusher from "pusher-js";
import PusherServer from "pusher";
import Echo from "laravel-echo";

const { PARLOR_PORT, APP_ID, APP_KEY, APP_SECRET, USER_ID, CHANNELS, PARLOR_TOKEN } = process.env;
const out = (line) => process.stdout.write(JSON.stringify(line) + "\n");

const sdk = new PusherServer({
  appId: APP_ID ?? "demo",
  key: APP_KEY,
  secret: APP_SECRET,
  host: "127.0.0.1",
  port: PARLOR_PORT,
  useTLS: false,
});
const user = USER_ID ?? "ann";

// The app's auth endpoint: pusher-js posts socket_id and channel_name (or, for a sign-in,
// socket_id alone) as a form.
const auth = http.createServer((req, res) => {
  let body = "";
  req.on("data", (chunk) => (body += chunk));
  req.on("end", () => {
    const form = new URLSearchParams(body);
    const socket = form.get("socket_id");
    const channel = form.get("channel_name");
    const signed = req.url.startsWith("/user-auth")
      ? sdk.authenticateUser(socket, { id: user, name: `User ${user}` })
      : channel.startsWith("presence-")
        ? sdk.authorizeChannel(socket, channel, { user_id: user, user_info: { name: `User ${user}` } })
        : sdk.authorizeChannel(socket, channel);
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(signed));
  });
});
await new Promise((ready) => auth.listen(0, "127.0.0.1", ready));
const appAuth = `http://127.0.0.1:${auth.address().port}`;

const client = new Pusher(APP_KEY, {
  cluster: "mt1",
  wsHost: "127.0.0.1",
  wsPort: Number(PARLOR_PORT),
  forceTLS: false,
  enabledTransports: ["ws"],
  disableStats: true,
  channelAuthorization: PARLOR_TOKEN
    ? {
        endpoint: `http://127.0.0.1:${PARLOR_PORT}/pusher/auth`,
        transport: "ajax",
        headers: { authorization: `Bearer ${PARLOR_TOKEN}` },
      }
    : { endpoint: `${appAuth}/pusher/auth`, transport: "ajax" },
  userAuthentication: { endpoint: `${appAuth}/user-auth`, transport: "ajax" },
});
client.connection.bind("state_change", (s) => out({ event: "state", state: s.current }));
client.connection.bind("error", (e) =>
  out({ event: "error", code: e?.data?.code ?? e?.error?.data?.code ?? null }),
);
client.connection.bind("connected", () =>
  out({ event: "connected", socketId: client.connection.socket_id }),
);
client.connection.bind("message", (m) => {
  if (m.event === "pusher:error") out({ event: "pusher-error", data: m.data });
  // A client event's sender, as pusher-js hands it to a per-event binding's metadata.
  if (m.event.startsWith("client-"))
    out({ event: "client-meta", channel: m.channel, name: m.event, userId: m.user_id ?? null });
});

const members = (channel) => ({
  count: channel.members.count,
  ids: Object.keys(channel.members.members).sort(),
  me: channel.members.me?.id ?? null,
});

function subscribe(name) {
  const channel = client.subscribe(name);
  channel.bind("pusher:subscription_succeeded", () =>
    out({
      event: "subscribed",
      channel: name,
      ...(name.startsWith("presence-") ? { members: members(channel) } : {}),
    }),
  );
  channel.bind("pusher:subscription_error", (e) =>
    out({ event: "subscription_error", channel: name, status: e?.status ?? null }),
  );
  channel.bind("pusher:member_added", (m) =>
    out({ event: "member_added", channel: name, id: m.id, info: m.info, members: members(channel) }),
  );
  channel.bind("pusher:member_removed", (m) =>
    out({ event: "member_removed", channel: name, id: m.id, members: members(channel) }),
  );
  channel.bind("chat-message", (message) => out({ event: "chat-message", channel: name, message }));
  channel.bind_global((event, data) => {
    if (!event.startsWith("pusher") && event !== "chat-message") {
      out({ event: "event", channel: name, name: event, data });
    }
  });
}
for (const name of (CHANNELS ?? "").split(",").filter(Boolean)) subscribe(name);

client.user.bind_global((event, data) => out({ event: "user-event", name: event, data }));

const echo = new Echo({ broadcaster: "pusher", key: APP_KEY, client });

async function reply(of, call) {
  try {
    const res = await call();
    const text = await res.text();
    out({ event: "reply", of, status: res.status, body: text ? JSON.parse(text) : null });
  } catch (e) {
    out({ event: "reply", of, status: e.status ?? null, body: e.body ?? String(e) });
  }
}

const commands = {
  subscribe: (c) => subscribe(c.channel),
  unsubscribe: (c) => client.unsubscribe(c.channel),
  client: (c) => out({ event: "sent", ok: client.channel(c.channel).trigger(c.event, c.data) }),
  signin: () => {
    client.signin();
    client.user.signinDonePromise.then(() => out({ event: "signed_in" }));
  },
  echo: (c) =>
    echo.private(c.channel).listen(c.event, (e) => out({ event: "echo", channel: c.channel, data: e })),
  trigger: (c) =>
    reply("trigger", () =>
      sdk.trigger(c.channels, c.event, c.data, c.exclude_me ? { socket_id: client.connection.socket_id } : {}),
    ),
  batch: (c) => reply("batch", () => sdk.triggerBatch(c.batch)),
  get: (c) => reply("get", () => sdk.get({ path: c.path, params: c.params ?? {} })),
  send_to_user: (c) => reply("send_to_user", () => sdk.sendToUser(c.user, c.event, c.data)),
  terminate: (c) => reply("terminate", () => sdk.terminateUserConnections(c.user)),
};

let buffered = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  buffered += chunk;
  let at;
  while ((at = buffered.indexOf("\n")) >= 0) {
    const line = buffered.slice(0, at);
    buffered = buffered.slice(at + 1);
    if (line.trim()) {
      const command = JSON.parse(line);
      commands[command.do](command);
    }
  }
});
process.stdin.on("end", () => {
  client.disconnect();
  auth.close();
  process.exit(0);
});
