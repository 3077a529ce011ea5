// flowcraft's companion Worker: the Cloudflare side of flowcraft-cloudflare.
//
// The Python adapter runs outside Cloudflare and calls this Worker over HTTPS. Every
// route but /health needs "Authorization: Bearer <FLOWCRAFT_SECRET>" (compared in
// constant time). All routes live under /flowcraft/v1/ and answer JSON.
//
//   POST /flowcraft/v1/do       {object, ttl, ops}        one atomic batch on a run's object
//   POST /flowcraft/v1/wait     {object, timeout}         long poll for the run's final result
//   POST /flowcraft/v1/enqueue  {inbox, direct, messages} send jobs (Cloudflare Queue or inbox)
//   POST /flowcraft/v1/inbox    {inbox, op, ...}          pull / extend / ack (+ riders) / release / dead
//   POST /flowcraft/v1/registry {object, op, ...}         stalled runs (the reconciler) / list
//   POST /flowcraft/v1/raw      raw bytes                 put bytes on the queue as they are
//   GET  /flowcraft/v1/health                             {"ok": true}
//
// FlowcraftRun: one SQLite-backed Durable Object per run (name "r:<run id>"), holding
// the run's context, its coordination keys (each with an expiry; an expired key reads
// as absent everywhere) and its final result. A batch runs inside one transactionSync:
// nothing else runs on the object meanwhile and a failure rolls all of it back, which
// gives the atomic patch, the guarded patch, increment and set-if-absent.
//
// FlowcraftInbox: one per logical queue. The queue() handler moves Cloudflare Queue
// messages into it and acks them only after that write; Python pulls from it with a
// visibility lease, renews, acks, releases with a delay or dead-letters.
//
// Values are the JSON text Python wrote; the Worker stores and returns that text
// unparsed, so numbers (big ints, 1e308, 0.1) come back exactly as written.

import { DurableObject } from "cloudflare:workers";

const MAX_ROW_BYTES = 2 * 1024 * 1024; // SQLite-backed Durable Objects: 2 MB per row
const MAX_DELAY_SECONDS = 12 * 3600; // Cloudflare Queues' delay ceiling, kept for hand-backs
const MAX_PULL = 100;
const MAX_WAIT_MS = 25_000;
const DEFAULT_TRACK_MS = 7 * 24 * 3600 * 1000; // a registry entry's life without a state TTL
const REGISTRY_GRACE_MS = 60_000; // a run entered but not yet written is not dropped before
const MAX_STALLED_SCAN = 1000;
const encoder = new TextEncoder();

const json = (data, status = 200) =>
  new Response(JSON.stringify(data), {
    status,
    headers: { "content-type": "application/json" },
  });

class TooLarge extends Error {
  constructor(key, bytes) {
    super(`value for ${JSON.stringify(key)} is ${bytes} bytes (limit ${MAX_ROW_BYTES})`);
    this.key = key;
    this.bytes = bytes;
  }
}

class BadRequest extends Error {}

function rowBytes(key, value) {
  // A UTF-16 unit is at most 3 UTF-8 bytes: measure only values that could be too big.
  if ((key.length + value.length) * 3 <= MAX_ROW_BYTES) return 0;
  return encoder.encode(key).length + encoder.encode(value).length;
}

function checkSize(key, value) {
  const bytes = rowBytes(key, value);
  if (bytes > MAX_ROW_BYTES) throw new TooLarge(key, bytes);
}

function str(value, what) {
  if (typeof value !== "string") throw new BadRequest(`${what} must be a string`);
  return value;
}

function positive(value, what) {
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new BadRequest(`${what} must be a finite number > 0`);
  }
  return value;
}

function failure(error) {
  if (error instanceof TooLarge) {
    return { error: "too_large", key: error.key, bytes: error.bytes, message: error.message };
  }
  if (error instanceof BadRequest) return { error: "bad_request", message: error.message };
  return { error: "internal", message: String(error?.message ?? error) };
}

// ---------------------------------------------------------------- one run's object

export class FlowcraftRun extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.schemaReady = false;
    this.alarmAt = undefined; // cached alarm time (ms), null when none is set
    this.waiters = new Set();
  }

  schema() {
    if (this.schemaReady) return;
    this.sql.exec("CREATE TABLE IF NOT EXISTS ctx (k TEXT PRIMARY KEY, v TEXT NOT NULL)");
    this.sql.exec(
      "CREATE TABLE IF NOT EXISTS coord (k TEXT PRIMARY KEY, v TEXT NOT NULL, exp INTEGER NOT NULL)",
    );
    this.sql.exec("CREATE INDEX IF NOT EXISTS coord_exp ON coord (exp)");
    this.sql.exec("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)");
    this.schemaReady = true;
  }

  one(query, ...params) {
    const rows = this.sql.exec(query, ...params).toArray();
    return rows.length ? rows[0] : null;
  }

  live(key, now) {
    const row = this.one("SELECT v, exp FROM coord WHERE k = ?", key);
    return row !== null && row.exp > now ? row : null;
  }

  expiresAt() {
    const row = this.one("SELECT v FROM meta WHERE k = 'expires'");
    return row === null ? 0 : Number(row.v);
  }

  /** Run `ops` as one atomic step; `ttl` (seconds) keeps the object alive after a write.
   *
   * A patch that writes the run's status carries `track` ({registry, run, status}): a
   * run that becomes "running" enters its namespace's FlowcraftRegistry before the
   * write (an entry for a write that then fails is dropped by the registry's own
   * check), and one that stops running leaves it after the write applied (an entry
   * whose removal was lost is dropped by that check too). */
  async batch(ops, ttl) {
    this.schema();
    const now = Date.now();
    const ttlMs = ttl ? Math.ceil(positive(ttl, "ttl") * 1000) : DEFAULT_TRACK_MS;
    const tracked = ops.filter((op) => op.op === "patch" && op.track);
    for (const op of tracked) {
      if (op.track.status === "running") await this.track(op.track, true, ttlMs);
    }
    let keepUntil = 0;
    let published = false;
    let results;
    try {
      results = this.ctx.storage.transactionSync(() => {
        const out = [];
        for (const op of ops) {
          const [result, until, wrote] = this.apply(op, now, ttl);
          if (until > keepUntil) keepUntil = until;
          if (wrote === "result") published = true;
          out.push(result);
        }
        if (keepUntil > this.expiresAt()) {
          this.sql.exec(
            "INSERT INTO meta (k, v) VALUES ('expires', ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            String(keepUntil),
          );
        }
        return out;
      });
    } catch (error) {
      return failure(error);
    }
    if (keepUntil) await this.scheduleAlarm(keepUntil);
    if (published) this.wake();
    for (const [i, op] of ops.entries()) {
      if (op.op !== "patch" || !op.track) continue;
      // Leave the registry when the run stopped running: this write ended it, or (a
      // refused "running" write, e.g. a repeated start of a finished run) it had ended.
      const leaves = results[i].applied
        ? op.track.status !== "running"
        : op.track.status === "running" && this.statusOf(op.track.key) !== "running";
      if (!leaves) continue;
      try {
        await this.track(op.track, false, ttlMs);
      } catch (error) {
        console.error(`run ${op.track.run}: leaving the registry failed: ${error}`);
      }
    }
    return { results };
  }

  /** Enter (`active`) or leave the namespace's index of running runs. */
  async track(track, active, ttlMs) {
    const registry = str(track.registry, "registry");
    const stub = this.env.REGISTRY.get(this.env.REGISTRY.idFromName(registry));
    await stub.track(str(track.run, "run"), this.ctx.id.toString(), active, ttlMs);
  }

  /** The `status` field of the run's status record; null when there is none. */
  statusOf(statusKey) {
    const row = this.one("SELECT v FROM ctx WHERE k = ?", str(statusKey, "status key"));
    if (row === null) return null;
    try {
      return JSON.parse(row.v)?.status ?? null;
    } catch {
      return null;
    }
  }

  /** The run's status (null when the object holds no run) and its last context write. */
  progress(statusKey) {
    this.schema();
    const touched = this.one("SELECT v FROM meta WHERE k = 'touched'");
    return { status: this.statusOf(statusKey), touched: touched === null ? 0 : Number(touched.v) };
  }

  apply(op, now, ttl) {
    const ttlMs = (seconds) => Math.ceil(positive(seconds, "ttl") * 1000);
    switch (op.op) {
      case "get": {
        const values = [];
        for (const key of op.keys) {
          const row = this.one("SELECT v FROM ctx WHERE k = ?", str(key, "key"));
          if (row !== null) values.push([key, row.v]);
        }
        return [{ values }, 0];
      }
      case "dump": {
        const values = this.sql.exec("SELECT k, v FROM ctx").toArray().map((r) => [r.k, r.v]);
        return [{ values }, 0];
      }
      case "patch": {
        for (const [key, expected] of op.guard ?? []) {
          const row = this.one("SELECT v FROM ctx WHERE k = ?", str(key, "guard key"));
          const current = row === null ? null : row.v;
          if (current !== expected) return [{ applied: false }, 0];
        }
        for (const [key, value] of op.set ?? []) {
          checkSize(str(key, "key"), str(value, "value"));
          this.sql.exec(
            "INSERT INTO ctx (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            key,
            value,
          );
        }
        for (const key of op.delete ?? []) {
          this.sql.exec("DELETE FROM ctx WHERE k = ?", str(key, "key"));
        }
        // The run's last progress, which the registry's stall check reads.
        this.sql.exec(
          "INSERT INTO meta (k, v) VALUES ('touched', ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
          String(now),
        );
        return [{ applied: true }, ttl ? now + ttlMs(ttl) : 0];
      }
      case "incr": {
        const key = str(op.key, "key");
        const row = this.live(key, now);
        const exp = row === null ? now + ttlMs(op.ttl) : row.exp;
        const current = row === null ? 0 : Number(row.v);
        if (!Number.isSafeInteger(current)) throw new BadRequest(`${key} is not a counter`);
        const value = current + 1;
        this.sql.exec(
          "INSERT INTO coord (k, v, exp) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v, exp = excluded.exp",
          key,
          String(value),
          exp,
        );
        return [{ value }, exp];
      }
      case "setnx": {
        const key = str(op.key, "key");
        const value = str(op.value, "value");
        if (this.live(key, now) !== null) return [{ set: false }, 0];
        checkSize(key, value);
        const exp = now + ttlMs(op.ttl);
        this.sql.exec(
          "INSERT INTO coord (k, v, exp) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v, exp = excluded.exp",
          key,
          value,
          exp,
        );
        return [{ set: true }, exp];
      }
      case "expire": {
        const key = str(op.key, "key");
        if (this.live(key, now) === null) return [{ ok: false }, 0];
        const exp = now + ttlMs(op.ttl);
        this.sql.exec("UPDATE coord SET exp = ? WHERE k = ?", exp, key);
        return [{ ok: true }, exp];
      }
      case "cget": {
        const row = this.live(str(op.key, "key"), now);
        return [{ value: row === null ? null : row.v }, 0];
      }
      case "cdel": {
        for (const key of op.keys) this.sql.exec("DELETE FROM coord WHERE k = ?", str(key, "key"));
        return [{}, 0];
      }
      case "admit": {
        // A job's admission in one step (the base's admit hook): the first reads, the
        // pending activation's record, wait mark and likely input, and the lease when
        // the run is this blueprint version, not final, and the record waits unpaused.
        const readCtx = (keys) => {
          const values = [];
          for (const key of keys) {
            const row = this.one("SELECT v FROM ctx WHERE k = ?", str(key, "key"));
            if (row !== null) values.push([key, row.v]);
          }
          return values;
        };
        const state = readCtx(op.first);
        const text = new Map(state);
        const resolvedText = text.get(op.first[2]);
        const resolved = resolvedText === undefined ? 0 : Number(JSON.parse(resolvedText));
        if (!Number.isSafeInteger(resolved)) return [{ state, found: null, leased: null }, 0];
        const g = resolved + 1;
        const record = `${op.activation[0]}${g}${op.activation[1]}`;
        const found = readCtx([record, op.waiting, ...(g === 1 ? op.inputs[0] : op.inputs[1])]);
        const has = new Set(found.map(([k]) => k));
        const meta = text.has(op.first[0]) ? JSON.parse(text.get(op.first[0])) : null;
        const status = text.has(op.first[1]) ? JSON.parse(text.get(op.first[1])) : null;
        const ours =
          meta !== null &&
          meta.blueprintId === op.blueprint[0] &&
          meta.version === op.blueprint[1] &&
          !op.final.includes(status?.status);
        if (!ours || !has.has(record) || has.has(op.waiting)) {
          return [{ state, found, leased: null }, 0];
        }
        const key = `${op.lease}${g}`;
        if (this.live(key, now) !== null) return [{ state, found, leased: false }, 0];
        const exp = now + ttlMs(op.ttl);
        this.sql.exec(
          "INSERT INTO coord (k, v, exp) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v, exp = excluded.exp",
          key,
          str(op.holder, "holder"),
          exp,
        );
        return [{ state, found, leased: true }, exp];
      }
      case "coord_keys": {
        // Live coordination keys and their remaining lifetime (ms): tools and tests.
        const rows = this.sql.exec("SELECT k, exp FROM coord WHERE exp > ?", now).toArray();
        return [{ keys: rows.map((r) => [r.k, r.exp - now]) }, 0];
      }
      case "result_put": {
        const value = str(op.value, "result");
        checkSize("result", value);
        const before = this.one("SELECT v FROM meta WHERE k = 'result'");
        if (before !== null) return [{ stored: false }, 0];
        this.sql.exec("INSERT INTO meta (k, v) VALUES ('result', ?)", value);
        return [{ stored: true }, ttl ? now + ttlMs(ttl) : 0, "result"];
      }
      case "result_get": {
        const row = this.one("SELECT v FROM meta WHERE k = 'result'");
        return [{ value: row === null ? null : row.v }, 0];
      }
      default:
        throw new BadRequest(`unknown op ${JSON.stringify(op.op)}`);
    }
  }

  /** Wait up to `timeoutMs` for the final result; null if it is not there by then. */
  async waitResult(timeoutMs) {
    this.schema();
    const read = () => this.one("SELECT v FROM meta WHERE k = 'result'")?.v ?? null;
    const now = read();
    if (now !== null) return { value: now };
    await new Promise((resolve) => {
      const waiter = {
        resolve: () => {
          clearTimeout(timer);
          this.waiters.delete(waiter);
          resolve();
        },
      };
      const timer = setTimeout(waiter.resolve, Math.min(Math.max(timeoutMs, 0), MAX_WAIT_MS));
      this.waiters.add(waiter);
    });
    return { value: read() };
  }

  wake() {
    const waiters = [...this.waiters];
    this.waiters.clear();
    for (const waiter of waiters) waiter.resolve();
  }

  async scheduleAlarm(at) {
    if (this.alarmAt === undefined) this.alarmAt = await this.ctx.storage.getAlarm();
    if (this.alarmAt === null) {
      await this.ctx.storage.setAlarm(at);
      this.alarmAt = at;
    }
  }

  /** Purge expired coordination keys; delete the whole object once everything expired. */
  async alarm() {
    this.schema();
    const now = Date.now();
    this.sql.exec("DELETE FROM coord WHERE exp <= ?", now);
    const until = this.expiresAt();
    if (until > now) {
      await this.ctx.storage.setAlarm(until);
      this.alarmAt = until;
      return;
    }
    await this.ctx.storage.deleteAll();
    this.schemaReady = false;
    this.alarmAt = null;
  }
}

// ---------------------------------------------------------------- the index of running runs

// FlowcraftRegistry: one per namespace (name "<namespace>/runs"), the reconciler's index
// of running runs. Run objects enter a run when its status becomes "running" and remove
// it when the status becomes anything else (awaiting, completed, failed, cancelled).
// Each entry expires with the run's state TTL (an alarm purges it), so the index holds
// at most the runs started within one TTL. `stalled` asks each candidate's run object
// for its status and last context write, which corrects any entry a lost call left.
export class FlowcraftRegistry extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(
      "CREATE TABLE IF NOT EXISTS active (run TEXT PRIMARY KEY, obj TEXT NOT NULL, " +
        "since INTEGER NOT NULL, checked INTEGER NOT NULL, exp INTEGER NOT NULL)",
    );
    this.sql.exec("CREATE INDEX IF NOT EXISTS active_checked ON active (checked)");
    this.sql.exec("CREATE INDEX IF NOT EXISTS active_exp ON active (exp)");
    this.alarmAt = undefined;
  }

  /** Enter `run` (its object id `obj`) for `ttlMs`, or remove it. */
  async track(run, obj, active, ttlMs) {
    const now = Date.now();
    if (!active) {
      this.sql.exec("DELETE FROM active WHERE run = ?", run);
      return {};
    }
    const exp = now + ttlMs;
    this.sql.exec(
      "INSERT INTO active (run, obj, since, checked, exp) VALUES (?, ?, ?, ?, ?) " +
        "ON CONFLICT (run) DO UPDATE SET obj = excluded.obj, checked = excluded.checked, exp = excluded.exp",
      run,
      obj,
      now,
      now,
      exp,
    );
    if (this.alarmAt === undefined) this.alarmAt = await this.ctx.storage.getAlarm();
    if (this.alarmAt === null) {
      await this.ctx.storage.setAlarm(exp);
      this.alarmAt = exp;
    }
    return {};
  }

  /** Up to `limit` running runs whose last context write is at least `ageMs` old. A
   * run returned moves to the back of the index (it is found again only after another
   * `ageMs` without progress); entries of runs no longer running are removed. */
  async stalled(ageMs, limit, statusKey) {
    const now = Date.now();
    const cutoff = now - Math.max(Number(ageMs) || 0, 0);
    const scan = Math.min(Math.max(Math.floor(limit) || 1, 1), MAX_STALLED_SCAN);
    const rows = this.sql
      .exec(
        "SELECT run, obj, since FROM active WHERE checked <= ? AND exp > ? ORDER BY checked LIMIT ?",
        cutoff,
        now,
        scan,
      )
      .toArray();
    const answers = await Promise.all(
      rows.map((row) =>
        this.env.RUNS.get(this.env.RUNS.idFromString(row.obj))
          .progress(statusKey)
          .catch((error) => {
            console.error(`run ${row.run}: progress check failed: ${error}`);
            return null;
          }),
      ),
    );
    const found = [];
    this.ctx.storage.transactionSync(() => {
      rows.forEach((row, i) => {
        const answer = answers[i];
        if (answer === null) return;
        if (answer.status === null && now - row.since < REGISTRY_GRACE_MS) return;
        if (answer.status !== "running") {
          this.sql.exec("DELETE FROM active WHERE run = ?", row.run);
        } else if (answer.touched <= cutoff) {
          found.push(row.run);
          this.sql.exec("UPDATE active SET checked = ? WHERE run = ?", now, row.run);
        } else {
          this.sql.exec("UPDATE active SET checked = ? WHERE run = ?", answer.touched, row.run);
        }
      });
    });
    return { runs: found };
  }

  /** The entries (tools and tests): [run, ms since its last check]. */
  list(limit) {
    const now = Date.now();
    const rows = this.sql
      .exec("SELECT run, checked FROM active WHERE exp > ? ORDER BY checked LIMIT ?", now, limit)
      .toArray();
    return { runs: rows.map((r) => [r.run, now - r.checked]) };
  }

  async alarm() {
    const now = Date.now();
    this.sql.exec("DELETE FROM active WHERE exp <= ?", now);
    const next = this.sql.exec("SELECT MIN(exp) AS t FROM active").one().t;
    this.alarmAt = next === null ? null : next;
    if (next !== null) await this.ctx.storage.setAlarm(next);
  }
}

// ---------------------------------------------------------------- one queue's inbox

export class FlowcraftInbox extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(
      "CREATE TABLE IF NOT EXISTS msgs (id TEXT PRIMARY KEY, body TEXT NOT NULL, " +
        "visible INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, lease TEXT, sent INTEGER NOT NULL)",
    );
    this.sql.exec("CREATE INDEX IF NOT EXISTS msgs_visible ON msgs (visible)");
    this.sql.exec(
      "CREATE TABLE IF NOT EXISTS dead (id TEXT PRIMARY KEY, body TEXT NOT NULL, reason TEXT NOT NULL, " +
        "attempts INTEGER NOT NULL, at INTEGER NOT NULL)",
    );
    this.waiters = new Set();
  }

  wake() {
    const waiters = [...this.waiters];
    this.waiters.clear();
    for (const resolve of waiters) resolve();
  }

  /** Store messages ({id, body, delay}); an id already stored is not stored again. */
  push(messages) {
    const now = Date.now();
    let added = 0;
    this.ctx.storage.transactionSync(() => {
      for (const m of messages) {
        const delay = Math.min(Math.max(Number(m.delay) || 0, 0), MAX_DELAY_SECONDS);
        const cursor = this.sql.exec(
          "INSERT OR IGNORE INTO msgs (id, body, visible, sent) VALUES (?, ?, ?, ?)",
          str(m.id, "id"),
          str(m.body, "body"),
          now + Math.round(delay * 1000),
          now,
        );
        added += cursor.rowsWritten > 0 ? 1 : 0;
      }
    });
    if (added) this.wake();
    return { added };
  }

  take(max, visibilityMs) {
    const now = Date.now();
    return this.ctx.storage.transactionSync(() => {
      const rows = this.sql
        .exec(
          "SELECT id, body, attempts FROM msgs WHERE visible <= ? ORDER BY visible LIMIT ?",
          now,
          max,
        )
        .toArray();
      const out = [];
      for (const row of rows) {
        const lease = crypto.randomUUID();
        this.sql.exec(
          "UPDATE msgs SET visible = ?, attempts = attempts + 1, lease = ? WHERE id = ?",
          now + visibilityMs,
          lease,
          row.id,
        );
        out.push({ id: row.id, body: row.body, attempts: row.attempts + 1, lease });
      }
      return out;
    });
  }

  /** Up to `max` visible messages, each hidden for `visibility` s; waits up to `wait` s. */
  async pull(max, visibility, wait) {
    const limit = Math.min(Math.max(Math.floor(max), 1), MAX_PULL);
    const visibilityMs = Math.ceil(positive(visibility, "visibility") * 1000);
    const deadline = Date.now() + Math.min(Math.max(wait || 0, 0) * 1000, MAX_WAIT_MS);
    for (;;) {
      const got = this.take(limit, visibilityMs);
      const now = Date.now();
      if (got.length || now >= deadline) return { messages: got };
      const next = this.sql.exec("SELECT MIN(visible) AS t FROM msgs").one().t;
      const until = next === null ? deadline : Math.min(deadline, Math.max(next, now + 5));
      await new Promise((resolve) => {
        const timer = setTimeout(() => {
          this.waiters.delete(done);
          resolve();
        }, until - now);
        const done = () => {
          clearTimeout(timer);
          resolve();
        };
        this.waiters.add(done);
      });
    }
  }

  /** Keep leased messages ({id, lease, seconds}) hidden longer; one bool per message. */
  extend(items) {
    const now = Date.now();
    const ok = [];
    this.ctx.storage.transactionSync(() => {
      for (const it of items) {
        const ms = Math.ceil(positive(it.seconds, "seconds") * 1000);
        const cursor = this.sql.exec(
          "UPDATE msgs SET visible = ? WHERE id = ? AND lease = ?",
          now + ms,
          str(it.id, "id"),
          str(it.lease, "lease"),
        );
        ok.push(cursor.rowsWritten > 0);
      }
    });
    return { ok };
  }

  /** Remove messages ({id, lease}) for good; a lease that was lost removes nothing. */
  ack(items) {
    let removed = 0;
    this.ctx.storage.transactionSync(() => {
      for (const it of items) {
        const cursor = this.sql.exec(
          "DELETE FROM msgs WHERE id = ? AND lease = ?",
          str(it.id, "id"),
          str(it.lease, "lease"),
        );
        removed += cursor.rowsWritten > 0 ? 1 : 0;
      }
    });
    return { removed };
  }

  /** Make messages ({id, lease, delay, refund}) visible again after `delay` s (<= 12 h). */
  release(items) {
    const now = Date.now();
    let released = 0;
    let soon = false;
    this.ctx.storage.transactionSync(() => {
      for (const it of items) {
        const delay = Math.min(Math.max(Number(it.delay) || 0, 0), MAX_DELAY_SECONDS);
        // A refunded release (a hand-back, not a failed attempt) gives the delivery back.
        const cursor = this.sql.exec(
          "UPDATE msgs SET visible = ?, lease = NULL, attempts = MAX(attempts - ?, 0) " +
            "WHERE id = ? AND lease = ?",
          now + Math.round(delay * 1000),
          it.refund ? 1 : 0,
          str(it.id, "id"),
          str(it.lease, "lease"),
        );
        if (cursor.rowsWritten > 0) {
          released += 1;
          soon ||= delay === 0;
        }
      }
    });
    if (soon) this.wake();
    return { released };
  }

  /** Park messages ({id, lease, reason}) with their reason and remove them from the queue. */
  dead(items) {
    const now = Date.now();
    let parked = 0;
    this.ctx.storage.transactionSync(() => {
      for (const it of items) {
        const row = this.sql
          .exec(
            "SELECT body, attempts FROM msgs WHERE id = ? AND lease = ?",
            str(it.id, "id"),
            str(it.lease, "lease"),
          )
          .toArray()[0];
        if (row === undefined) continue;
        this.sql.exec(
          "INSERT OR REPLACE INTO dead (id, body, reason, attempts, at) VALUES (?, ?, ?, ?, ?)",
          it.id,
          row.body,
          str(it.reason, "reason"),
          row.attempts,
          now,
        );
        this.sql.exec("DELETE FROM msgs WHERE id = ?", it.id);
        parked += 1;
      }
    });
    return { parked };
  }

  /** Park messages pulled elsewhere ({id, body, reason, attempts}): the dead letters of
   * the HTTP pull delivery, kept beside this inbox's own. */
  park(items) {
    const now = Date.now();
    this.ctx.storage.transactionSync(() => {
      for (const it of items) {
        this.sql.exec(
          "INSERT OR REPLACE INTO dead (id, body, reason, attempts, at) VALUES (?, ?, ?, ?, ?)",
          str(it.id, "id"),
          str(it.body, "body"),
          str(it.reason, "reason"),
          Math.max(Math.floor(Number(it.attempts) || 0), 0),
          now,
        );
      }
    });
    return { parked: items.length };
  }

  /** Put up to `limit` dead letters (the oldest first) back among the messages, under
   * new ids, in one transaction: a letter is parked or queued again, never both or
   * neither. */
  requeueDead(limit) {
    const now = Date.now();
    const requeued = this.ctx.storage.transactionSync(() => {
      const rows = this.sql
        .exec("SELECT id, body FROM dead ORDER BY at, id LIMIT ?", limit)
        .toArray();
      for (const row of rows) {
        this.sql.exec(
          "INSERT INTO msgs (id, body, visible, sent) VALUES (?, ?, ?, ?)",
          crypto.randomUUID(),
          row.body,
          now,
          now,
        );
        this.sql.exec("DELETE FROM dead WHERE id = ?", row.id);
      }
      return rows.length;
    });
    if (requeued) this.wake();
    return { requeued };
  }

  /** Delete dead letters: those named by `ids`, else up to `limit` of the oldest (all
   * when `limit` is null). */
  purgeDead(limit, ids) {
    return this.ctx.storage.transactionSync(() => {
      const rows = Array.isArray(ids)
        ? ids.map((id) => ({ id: str(id, "id") }))
        : limit === null
          ? this.sql.exec("SELECT id FROM dead").toArray()
          : this.sql.exec("SELECT id FROM dead ORDER BY at, id LIMIT ?", limit).toArray();
      let purged = 0;
      for (const row of rows) {
        purged += this.sql.exec("DELETE FROM dead WHERE id = ?", row.id).rowsWritten > 0 ? 1 : 0;
      }
      return { purged };
    });
  }

  deadLetters(limit) {
    const rows = this.sql
      .exec("SELECT id, body, reason, attempts, at FROM dead ORDER BY at, id LIMIT ?", limit)
      .toArray();
    return { letters: rows };
  }

  stats() {
    const now = Date.now();
    const q = (query, ...p) => this.sql.exec(query, ...p).one().n;
    return {
      ready: q("SELECT COUNT(*) AS n FROM msgs WHERE visible <= ?", now),
      hidden: q("SELECT COUNT(*) AS n FROM msgs WHERE visible > ?", now),
      dead: q("SELECT COUNT(*) AS n FROM dead"),
    };
  }

  purge() {
    this.sql.exec("DELETE FROM msgs");
    this.sql.exec("DELETE FROM dead");
    return {};
  }
}

// ---------------------------------------------------------------- the entry Worker

async function authorized(request, env) {
  const expected = env.FLOWCRAFT_SECRET;
  if (typeof expected !== "string" || expected.length === 0) return false;
  const header = request.headers.get("authorization") ?? "";
  const token = header.startsWith("Bearer ") ? header.slice(7) : "";
  // Digests first: timingSafeEqual needs equal lengths, and the length must not leak.
  const [given, wanted] = await Promise.all([
    crypto.subtle.digest("SHA-256", encoder.encode(token)),
    crypto.subtle.digest("SHA-256", encoder.encode(expected)),
  ]);
  return crypto.subtle.timingSafeEqual(given, wanted);
}

const runObject = (env, name) => env.RUNS.get(env.RUNS.idFromName(name));
const inboxObject = (env, name) => env.INBOXES.get(env.INBOXES.idFromName(name));
const registryObject = (env, name) => env.REGISTRY.get(env.REGISTRY.idFromName(name));

async function registryCall(env, request) {
  const stub = registryObject(env, str(request.object, "object"));
  switch (request.op) {
    case "stalled":
      return stub.stalled(
        Number(request.older_than ?? 300) * 1000,
        request.limit ?? 100,
        str(request.status_key, "status_key"),
      );
    case "list":
      return stub.list(Math.min(Math.max(request.limit ?? 100, 1), 10_000));
    default:
      throw new BadRequest(`unknown registry op ${JSON.stringify(request.op)}`);
  }
}

function envelope(inbox, body, delay) {
  const message = { body: { i: inbox, b: body }, contentType: "json" };
  if (delay > 0) message.delaySeconds = Math.min(Math.ceil(delay), MAX_DELAY_SECONDS);
  return message;
}

async function enqueue(env, request) {
  const inbox = str(request.inbox, "inbox");
  const messages = request.messages ?? [];
  if (request.direct) {
    const stored = messages.map((m) => ({
      id: crypto.randomUUID(),
      body: str(m.body, "body"),
      delay: m.delay ?? 0,
    }));
    await inboxObject(env, inbox).push(stored);
    return { sent: stored.length };
  }
  // sendBatch takes at most 100 messages and 256 KB a call.
  let chunk = [];
  let bytes = 0;
  for (const m of messages) {
    const item = envelope(inbox, str(m.body, "body"), m.delay ?? 0);
    const size = encoder.encode(item.body.b).length + inbox.length + 164;
    if (chunk.length && (chunk.length === 100 || bytes + size > 250_000)) {
      await env.JOBS.sendBatch(chunk);
      chunk = [];
      bytes = 0;
    }
    chunk.push(item);
    bytes += size;
  }
  if (chunk.length) await env.JOBS.sendBatch(chunk);
  return { sent: messages.length };
}

async function inboxCall(env, request) {
  const stub = inboxObject(env, str(request.inbox, "inbox"));
  switch (request.op) {
    case "pull":
      return stub.pull(request.max ?? 1, request.visibility ?? 30, request.wait ?? 0);
    case "extend":
      return stub.extend(request.items ?? []);
    case "ack": {
      const answer = await stub.ack(request.items ?? []);
      // Write-behind ops for run objects riding along with the ack (follow-up marks):
      // forwarded after it; losing one is harmless, so a failure is only logged.
      await Promise.all(
        (request.riders ?? []).map(([name, ops]) =>
          runObject(env, str(name, "rider object"))
            .batch(ops, 0)
            .then((result) => {
              if (result.error) console.error(`riders for ${name}: ${result.message}`);
            })
            .catch((error) => console.error(`riders for ${name}: ${error}`)),
        ),
      );
      return answer;
    }
    case "release":
      return stub.release(request.items ?? []);
    case "dead":
      return stub.dead(request.items ?? []);
    case "park":
      return stub.park(request.items ?? []);
    case "dead_letters":
      return stub.deadLetters(Math.min(Math.max(request.limit ?? 100, 1), 1000));
    case "requeue_dead":
      return stub.requeueDead(Math.min(Math.max(request.limit ?? 100, 1), 1000));
    case "purge_dead":
      return stub.purgeDead(
        request.limit === null || request.limit === undefined ? null : Math.max(request.limit, 0),
        request.ids ?? null,
      );
    case "stats":
      return stub.stats();
    case "purge":
      return stub.purge();
    default:
      throw new BadRequest(`unknown inbox op ${JSON.stringify(request.op)}`);
  }
}

function rawText(body) {
  if (typeof body === "string") return body;
  if (body instanceof ArrayBuffer || ArrayBuffer.isView(body)) {
    return new TextDecoder("utf-8", { fatal: false }).decode(body);
  }
  try {
    return JSON.stringify(body) ?? String(body);
  } catch {
    return String(body);
  }
}

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const route = `${request.method} ${url.pathname}`;
    if (route === "GET /flowcraft/v1/health") return json({ ok: true });
    if (!url.pathname.startsWith("/flowcraft/v1/")) return json({ error: "not_found" }, 404);
    if (!(await authorized(request, env))) return json({ error: "unauthorized" }, 401);
    try {
      switch (route) {
        case "POST /flowcraft/v1/do": {
          const body = await request.json();
          const stub = runObject(env, str(body.object, "object"));
          const answer = await stub.batch(body.ops ?? [], body.ttl ?? 0);
          const status = answer.error === "too_large" ? 413 : answer.error ? 400 : 200;
          return json(answer, status);
        }
        case "POST /flowcraft/v1/wait": {
          const body = await request.json();
          const stub = runObject(env, str(body.object, "object"));
          return json(await stub.waitResult(Number(body.timeout ?? 20) * 1000));
        }
        case "POST /flowcraft/v1/enqueue":
          return json(await enqueue(env, await request.json()));
        case "POST /flowcraft/v1/inbox":
          return json(await inboxCall(env, await request.json()));
        case "POST /flowcraft/v1/registry":
          return json(await registryCall(env, await request.json()));
        case "POST /flowcraft/v1/raw":
          // The queue as any producer uses it: the bytes, no envelope.
          await env.JOBS.send(new Uint8Array(await request.arrayBuffer()), { contentType: "bytes" });
          return json({ sent: 1 });
        default:
          return json({ error: "not_found" }, 404);
      }
    } catch (error) {
      const answer = failure(error);
      return json(answer, answer.error === "bad_request" ? 400 : 500);
    }
  },

  // Moves each message into its inbox and acks it only after that write. A message
  // that is not flowcraft's envelope goes to DEFAULT_INBOX as its text, where the
  // Python worker fails to decode it and dead-letters it with the reason.
  async queue(batch, env) {
    const groups = new Map();
    for (const message of batch.messages) {
      const body = message.body;
      const ours =
        body !== null &&
        typeof body === "object" &&
        !ArrayBuffer.isView(body) &&
        !(body instanceof ArrayBuffer) &&
        typeof body.i === "string" &&
        typeof body.b === "string";
      const inbox = ours ? body.i : (env.DEFAULT_INBOX ?? "flowcraft-jobs");
      const text = ours ? body.b : rawText(body);
      if (!groups.has(inbox)) groups.set(inbox, []);
      groups.get(inbox).push({ message, stored: { id: message.id, body: text, delay: 0 } });
    }
    await Promise.all(
      [...groups].map(async ([inbox, items]) => {
        try {
          await inboxObject(env, inbox).push(items.map((it) => it.stored));
        } catch (error) {
          console.error(`inbox ${inbox}: could not store ${items.length} messages: ${error}`);
          for (const it of items) it.message.retry({ delaySeconds: 5 });
          return;
        }
        for (const it of items) it.message.ack();
      }),
    );
  },
};
