// Test worker for flowcraft's integration tests, run by Miniflare (workerd) offline.
//
// Routes (all answer JSON):
//   GET  /health                      -> {"ok": true} after a round trip through a Durable Object
//   POST /incr?key=K[&by=N]           -> {"key": K, "value": <new value>}, atomic per key
//   GET  /get?key=K                   -> {"key": K, "value": <value or null>}
//   POST /setnx?key=K  (body = value) -> {"key": K, "set": <bool>, "value": <stored value>}
//   PUT  /kv?key=K[&ttl=S] (body)     -> {"key": K}; KV put with optional expirationTtl
//   GET  /kv?key=K                    -> {"key": K, "value": <value or null>}
//   POST /queue/send (body)           -> {"sent": true}; the queue consumer records each
//                                        message in KV under "received:<body>"
//
// Each key has its own Durable Object (idFromName(key)), so increments on one key are
// serialised by that object's input gate: a storage get followed by a put, with no other
// await in between, cannot interleave with another request to the same object.

const json = (data, status = 200) =>
  new Response(JSON.stringify(data), {
    status,
    headers: { "content-type": "application/json" },
  });

export class Counter {
  constructor(state, env) {
    this.state = state;
    this.env = env;
  }

  async fetch(request) {
    const url = new URL(request.url);
    const key = url.searchParams.get("key");
    const storage = this.state.storage;
    switch (url.pathname) {
      case "/incr": {
        const by = Number.parseInt(url.searchParams.get("by") ?? "1", 10);
        if (!Number.isSafeInteger(by)) return json({ error: "by must be an integer" }, 400);
        const current = (await storage.get("value")) ?? 0;
        const value = current + by;
        await storage.put("value", value);
        return json({ key, value });
      }
      case "/get":
        return json({ key, value: (await storage.get("value")) ?? null });
      case "/setnx": {
        const candidate = await request.text();
        const existing = await storage.get("value");
        if (existing !== undefined) return json({ key, set: false, value: existing });
        await storage.put("value", candidate);
        return json({ key, set: true, value: candidate });
      }
      default:
        return json({ error: "not found" }, 404);
    }
  }
}

function objectFor(env, key) {
  return env.COUNTER.get(env.COUNTER.idFromName(key));
}

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const route = `${request.method} ${url.pathname}`;
    if (route === "GET /health") {
      const answer = await objectFor(env, "__health__").fetch("http://do/get?key=__health__");
      return json({ ok: answer.ok });
    }
    const key = url.searchParams.get("key");
    switch (route) {
      case "POST /incr":
      case "GET /get":
      case "POST /setnx": {
        if (!key) return json({ error: "key is required" }, 400);
        return objectFor(env, key).fetch(request);
      }
      case "PUT /kv": {
        if (!key) return json({ error: "key is required" }, 400);
        const ttl = url.searchParams.get("ttl");
        const options = ttl ? { expirationTtl: Number.parseInt(ttl, 10) } : {};
        await env.KV.put(key, await request.text(), options);
        return json({ key });
      }
      case "GET /kv": {
        if (!key) return json({ error: "key is required" }, 400);
        return json({ key, value: await env.KV.get(key) });
      }
      case "POST /queue/send": {
        await env.QUEUE.send(await request.text());
        return json({ sent: true });
      }
      default:
        return json({ error: "not found" }, 404);
    }
  },

  async queue(batch, env) {
    for (const message of batch.messages) {
      await env.KV.put(`received:${message.body}`, String(message.attempts));
      message.ack();
    }
  },
};
