// A pusher-js 8 client of Parlor's Pusher endpoint (`/app/{key}`), as an app would run it:
// its channel authorisations come from the app's own auth endpoint, a small HTTP server
// here that signs with the `pusher` server SDK's `authorizeChannel`. Driven by
// tests/pusher.rs: it prints one JSON line per thing that happens and exits when stdin
// closes.
//
// Environment: PARLOR_PORT, APP_KEY, APP_SECRET (what the auth endpoint signs with),
// CHANNELS (comma-separated, subscribed in order).
import http from "node:http";
import Pusher from "pusher-js";
import PusherServer from "pusher";

const { PARLOR_PORT, APP_KEY, APP_SECRET, CHANNELS } = process.env;
const out = (line) => process.stdout.write(JSON.stringify(line) + "\n");

const signer = new PusherServer({
  appId: "app",
  key: APP_KEY,
  secret: APP_SECRET,
  host: "127.0.0.1",
  port: PARLOR_PORT,
  useTLS: false,
});

// The app's auth endpoint: pusher-js posts socket_id and channel_name as a form.
const auth = http.createServer((req, res) => {
  let body = "";
  req.on("data", (chunk) => (body += chunk));
  req.on("end", () => {
    const form = new URLSearchParams(body);
    const signed = signer.authorizeChannel(form.get("socket_id"), form.get("channel_name"));
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(signed));
  });
});
await new Promise((ready) => auth.listen(0, "127.0.0.1", ready));

const client = new Pusher(APP_KEY, {
  cluster: "mt1",
  wsHost: "127.0.0.1",
  wsPort: Number(PARLOR_PORT),
  forceTLS: false,
  enabledTransports: ["ws"],
  disableStats: true,
  channelAuthorization: {
    endpoint: `http://127.0.0.1:${auth.address().port}/pusher/auth`,
    transport: "ajax",
  },
});
client.connection.bind("state_change", (s) => out({ event: "state", state: s.current }));
client.connection.bind("error", (e) =>
  out({ event: "error", code: e?.data?.code ?? e?.error?.data?.code ?? null }),
);
client.connection.bind("connected", () =>
  out({ event: "connected", socketId: client.connection.socket_id }),
);
for (const name of (CHANNELS ?? "").split(",").filter(Boolean)) {
  const channel = client.subscribe(name);
  channel.bind("pusher:subscription_succeeded", () => out({ event: "subscribed", channel: name }));
  channel.bind("pusher:subscription_error", (e) =>
    out({ event: "subscription_error", channel: name, status: e?.status ?? null }),
  );
  channel.bind("chat-message", (message) => out({ event: "chat-message", channel: name, message }));
}

process.stdin.on("end", () => {
  client.disconnect();
  auth.close();
  process.exit(0);
});
process.stdin.resume();
