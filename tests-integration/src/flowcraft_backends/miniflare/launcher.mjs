// Starts Miniflare (workerd, offline) with the test worker in this folder.
//
//   node launcher.mjs --port PORT [--host 127.0.0.1] [--modules DIR] [--persist DIR]
//                     [--worker CONFIG.json ...]
//
// --modules is a node_modules folder holding the pinned miniflare package (default: the
// one next to this file). With --persist, Durable Object and KV data survive a restart.
// Each --worker adds a packaged Worker beside the test worker (which stays the entry
// for every request no route claims): CONFIG.json holds Miniflare worker options
// (name, scriptPath relative to the file, routes, bindings, durableObjects, queues...);
// keys starting with "//" and "health" (a path checked at start) are not passed on.
// Prints one line "READY <url>" on stdout once the worker answers. On SIGTERM or SIGINT
// it disposes Miniflare and waits for workerd to exit before exiting itself.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({
  options: {
    port: { type: "string" },
    host: { type: "string", default: "127.0.0.1" },
    modules: { type: "string", default: join(here, "node_modules") },
    persist: { type: "string" },
    worker: { type: "string", multiple: true, default: [] },
  },
});
if (!values.port) {
  console.error("usage: node launcher.mjs --port PORT [--host H] [--modules DIR] [--persist DIR]");
  process.exit(2);
}

const require = createRequire(join(resolve(values.modules), "package.json"));
const { Miniflare, Log, LogLevel } = require("miniflare");

const persist = values.persist ? resolve(values.persist) : undefined;
const extraWorkers = values.worker.map((file) => {
  const config = JSON.parse(readFileSync(file, "utf8"));
  const { health, scriptPath, ...options } = config;
  for (const key of Object.keys(options)) if (key.startsWith("//")) delete options[key];
  const root = dirname(resolve(file));
  return {
    health,
    options: { ...options, modules: true, modulesRoot: root, scriptPath: join(root, scriptPath) },
  };
});
const mf = new Miniflare({
  host: values.host,
  port: Number.parseInt(values.port, 10),
  cf: false,
  log: new Log(LogLevel.WARN),
  telemetry: { enabled: false },
  ...(persist
    ? { durableObjectsPersist: join(persist, "do"), kvPersist: join(persist, "kv") }
    : {}),
  workers: [
    {
      name: "flowcraft-test",
      modules: true,
      modulesRoot: here,
      scriptPath: join(here, "worker.mjs"),
      compatibilityDate: "2026-04-01",
      durableObjects: { COUNTER: "Counter" },
      kvNamespaces: ["KV"],
      queueProducers: { QUEUE: "flowcraft-test" },
      queueConsumers: {
        "flowcraft-test": { maxBatchSize: 10, maxBatchTimeout: 1, maxRetries: 2 },
      },
    },
    ...extraWorkers.map((worker) => worker.options),
  ],
});

// Miniflare's exit hook kills workerd on SIGTERM/SIGINT and exits at once, leaving the
// dead workerd for init to reap, which can take seconds. Replace it with a handler that
// waits until workerd is gone (its "exit" hook stays as a last resort).
let stopping = false;
async function stop(signal) {
  if (stopping) return;
  stopping = true;
  console.log(`stopping on ${signal}`);
  await mf.dispose().catch((error) => console.error("dispose failed:", error));
  process.exit(0);
}
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.removeAllListeners(signal);
  process.on(signal, () => void stop(signal));
}

try {
  const url = await mf.ready;
  const answer = await mf.dispatchFetch(new URL("/health", url));
  if (!answer.ok) throw new Error(`health check answered ${answer.status}: ${await answer.text()}`);
  await answer.arrayBuffer();
  for (const { health, options } of extraWorkers) {
    if (!health) continue;
    const reply = await mf.dispatchFetch(new URL(health, url));
    if (!reply.ok) throw new Error(`${options.name} ${health} answered ${reply.status}`);
    await reply.arrayBuffer();
  }
  console.log(`READY ${url.href.replace(/\/$/, "")}`);
} catch (error) {
  console.error("miniflare failed to start:", error);
  await mf.dispose().catch(() => {});
  process.exit(1);
}
