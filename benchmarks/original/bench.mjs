// Benchmark of the ORIGINAL TypeScript flowcraft (npm `flowcraft` 2.10.1) with its
// BullMQ adapter (`@flowcraft/bullmq-adapter` 1.7.1), on the workload of
// benchmarks/bench_bullmq.py, so both can be measured on the same machine.
//
//     npm ci --prefix benchmarks/original
//     node benchmarks/original/bench.mjs --url redis://127.0.0.1:6379/0
//     node benchmarks/original/bench.mjs --url ... --runs 200 --shapes chain,diamond \
//         --workers 1,2 --concurrency 32 [--json] [--no-monitor] [--remove-on-complete]
//
// Workers are separate processes (this file forked with --worker), each one
// BullMQAdapter running start(). Flows as in bench_bullmq.py: `chain` (10 nodes, the
// first returns 1, each next its input + 1), `diamond` (start, 16 parallel nodes, an
// `all` join summing its inputs, end = 19 nodes); `chain20` only in the cost pass.
//
// Throughput pass, per shape and worker count: --runs runs are created while the
// BullMQ queue is paused, then the queue is resumed: all runs start at once, at t0.
// The pass ends when every run's final status is published (workflow:status:<runId>).
// node_jobs_per_s = runs x nodes / (last publication - t0); run latency = a run's
// publication time (stamped by the worker that published it) - t0. worker_cpu_s:
// process.cpuUsage() of each worker over the pass; redis_cpu_s from /proc (local
// server only); server_cmds_per_node_job from INFO commandstats, as in our bench.
//
// Cost pass (1 worker, MONITOR on, not timed): commands from the driver's connection
// (CLIENT SETNAME fc-bench-driver) are left out; client_cmds counts every other
// client-issued command (EVALSHA counts 1), in_script_cmds every command MONITOR marks
// `[0 lua]`, as bench_bullmq.py does. worker_in_script_cmds attributes each script's
// commands to the client whose EVALSHA precedes them, leaving out the driver's
// start-job scripts. marginal_client_cmds_per_chain_job = (chain20 - chain10 client
// commands) / (runs x 10).
//
// How a run is started: the original has no client "start run" call. Its distributed
// example writes the initial context into the workflow:state:<runId> hash and adds one
// `executeNode` job per start node. Here the driver does that through a BullMQAdapter
// that never calls start(): its RedisContext writes `blueprintVersion` (null, since the
// blueprints carry no version; without it the worker's version check compares
// undefined with null and silently drops the run's first job) and its enqueueJob adds
// the start jobs (jobId `<runId>_<nodeId>`, the adapter's default job options), the
// same path the workers use for successor jobs.
//
// Two settings the adapter does not expose are set from outside, each noted in the
// report: the BullMQ Worker's concurrency (the adapter hard-codes 5; --concurrency sets
// `worker.concurrency` after start(), BullMQ's public setter) and a `publishedAt` stamp
// added to the final-status record (a subclass overrides publishFinalResult, adds the
// field, calls the original; no extra Redis command).

import { fork } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { readFileSync } from 'node:fs'
import os from 'node:os'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

import { BullMQAdapter, RedisCoordinationStore } from '@flowcraft/bullmq-adapter'
import { analyzeBlueprint, createFlow, NullLogger } from 'flowcraft'
import Redis from 'ioredis'

const SCRIPT = fileURLToPath(import.meta.url)
const DRIVER_NAME = 'fc-bench-driver'
const WORKER_NAME = 'fc-orig-worker'
const SHIPPED_CONCURRENCY = 5 // BullMQAdapter.processJobs: `concurrency: 5`

// ---------------------------------------------------------------- the flows

const first = () => ({ output: 1 })
const next = (ctx) => ({ output: ctx.input + 1 })
const sum = (ctx) => ({ output: Object.values(ctx.input).reduce((a, b) => a + b, 0) })

function chain(n) {
	const flow = createFlow(`chain${n}`).node('n0', first)
	for (let i = 1; i < n; i++) flow.node(`n${i}`, next).edge(`n${i - 1}`, `n${i}`)
	return flow
}

function diamond(width = 16) {
	// A node's input in the original is `_inputs.<node>`, written by each incoming edge
	// (the last predecessor wins). For the join to see all 16 outputs, as `ctx.input`
	// does in our port, it declares them with the original's `inputs` mapping.
	const inputs = Object.fromEntries(Array.from({ length: width }, (_, i) => [`b${i}`, `b${i}`]))
	const flow = createFlow('diamond')
		.node('start', first)
		.node('join', sum, { inputs, config: { joinStrategy: 'all' } })
		.node('end', next)
	for (let i = 0; i < width; i++) flow.node(`b${i}`, next).edge('start', `b${i}`).edge(`b${i}`, 'join')
	return flow.edge('join', 'end')
}

// Built in the same order in every process: the builder's registry keys count calls.
const FLOWS = { chain: chain(10), chain20: chain(20), diamond: diamond() }
const NODES = { chain: 10, chain20: 20, diamond: 19 }
const BLUEPRINTS = Object.fromEntries(Object.values(FLOWS).map((f) => {
	const bp = f.toBlueprint()
	return [bp.id, bp]
}))
const BLUEPRINT_OF = { chain: 'chain10', chain20: 'chain20', diamond: 'diamond' }
const REGISTRY = Object.assign({}, ...Object.values(FLOWS).map((f) => Object.fromEntries(f.getFunctionRegistry())))

function expectedOk(shape, context) {
	if (shape === 'diamond') return context['_outputs.join'] === 32 && context['_outputs.end'] === 33
	const n = NODES[shape]
	return context[`_outputs.n${n - 1}`] === n
}

function runtimeOptions() {
	return { blueprints: BLUEPRINTS, registry: REGISTRY, logger: new NullLogger() }
}

function jobOptions(removeOnComplete) {
	// undefined: the adapter's defaults (completed jobs kept 7 days, failed 15 days).
	return removeOnComplete ? { removeOnComplete: true, removeOnFail: true } : undefined
}

const now = () => (performance.timeOrigin + performance.now()) / 1000 // seconds
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

class StampedAdapter extends BullMQAdapter {
	async publishFinalResult(runId, result) {
		return super.publishFinalResult(runId, { ...result, publishedAt: now() })
	}
}

// ---------------------------------------------------------------- worker process

async function workerMain(a) {
	const redis = new Redis(a.url, { maxRetriesPerRequest: null, connectionName: WORKER_NAME })
	const adapter = new StampedAdapter({
		runtimeOptions: runtimeOptions(),
		coordinationStore: new RedisCoordinationStore(redis),
		connection: redis,
		queueName: a.queue,
		defaultJobOptions: jobOptions(a['remove-on-complete']),
	})
	adapter.start()
	const worker = adapter.worker
	worker.concurrency = Number(a.concurrency)
	worker.on('error', (err) => console.error(`[worker ${process.pid}] ${err.message}`))
	worker.on('failed', (job, err) => console.error(`[worker ${process.pid}] job ${job?.id} failed: ${err.message}`))
	await worker.waitUntilReady()
	process.on('message', async (msg) => {
		if (msg.type === 'cpu') {
			const { user, system } = process.cpuUsage()
			process.send({ type: 'cpu', seconds: (user + system) / 1e6 })
		} else if (msg.type === 'stop') {
			await adapter.close()
			await redis.quit()
			process.send({ type: 'stopped' }, () => process.exit(0))
		}
	})
	process.send({ type: 'ready' })
}

// ---------------------------------------------------------------- driver

function reply(child, type) {
	return new Promise((resolve, reject) => {
		const onMessage = (msg) => {
			if (msg.type === type) {
				child.off('message', onMessage)
				child.off('exit', onExit)
				resolve(msg)
			}
		}
		const onExit = (code) => reject(new Error(`worker ${child.pid} exited (${code}) before '${type}'`))
		child.on('message', onMessage)
		child.once('exit', onExit)
	})
}

class Workers {
	static async start(a, queue, count) {
		const argv = ['--worker', '--url', a.url, '--queue', queue, '--concurrency', String(a.concurrency)]
		if (a['remove-on-complete']) argv.push('--remove-on-complete')
		const procs = Array.from({ length: count }, () => fork(SCRIPT, argv, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }))
		const workers = new Workers(procs)
		try {
			await Promise.all(procs.map((p) => reply(p, 'ready')))
		} catch (err) {
			await workers.stop()
			throw new Error(`a worker process did not start: ${err.message}`)
		}
		return workers
	}

	constructor(procs) {
		this.procs = procs
	}

	async cpu() {
		return Promise.all(this.procs.map(async (p) => {
			const answer = reply(p, 'cpu')
			p.send({ type: 'cpu' })
			return (await answer).seconds
		}))
	}

	async stop() {
		await Promise.all(this.procs.map(async (p) => {
			if (p.exitCode !== null || p.signalCode !== null) return
			const exited = new Promise((r) => p.once('exit', r))
			try {
				p.send({ type: 'stop' })
			} catch {
				p.kill()
			}
			const timer = setTimeout(() => p.kill('SIGKILL'), 30000)
			await exited
			clearTimeout(timer)
		}))
	}
}

function driverClient(a) {
	return new Redis(a.url, { maxRetriesPerRequest: null, connectionName: DRIVER_NAME })
}

function driverAdapter(a, redis, queue) {
	// Never start()ed: used for its RedisContext and enqueueJob, as a client would.
	return new BullMQAdapter({
		runtimeOptions: runtimeOptions(),
		coordinationStore: new RedisCoordinationStore(redis),
		connection: redis,
		queueName: queue,
		defaultJobOptions: jobOptions(a['remove-on-complete']),
	})
}

async function startRuns(adapter, shape, runs) {
	const blueprintId = BLUEPRINT_OF[shape]
	const startNodes = analyzeBlueprint(BLUEPRINTS[blueprintId]).startNodeIds
	const runIds = Array.from({ length: runs }, () => randomUUID())
	await Promise.all(runIds.map(async (runId) => {
		await adapter.createContext(runId).set('blueprintVersion', BLUEPRINTS[blueprintId].metadata?.version || null)
		for (const nodeId of startNodes) await adapter.enqueueJob({ runId, blueprintId, nodeId })
	}))
	return runIds
}

async function waitPublished(redis, shape, runIds, seconds) {
	const published = new Map()
	let pending = runIds
	const deadline = Date.now() + seconds * 1000
	while (pending.length) {
		const still = []
		for (let i = 0; i < pending.length; i += 1000) {
			const part = pending.slice(i, i + 1000)
			const values = await redis.mget(part.map((r) => `workflow:status:${r}`))
			part.forEach((runId, j) => {
				const raw = values[j]
				if (raw === null) return still.push(runId)
				const record = JSON.parse(raw)
				if (record.status !== 'completed') throw new Error(`run ${runId} ended ${record.status}: ${record.reason}`)
				if (!expectedOk(shape, record.payload.context)) {
					throw new Error(`run ${runId} (${shape}) completed with a wrong output: ${JSON.stringify(record.payload.context)}`)
				}
				published.set(runId, record.publishedAt)
			})
		}
		pending = still
		if (pending.length) {
			if (Date.now() > deadline) throw new Error(`${pending.length} of ${runIds.length} runs did not finish in ${seconds} s`)
			await sleep(20)
		}
	}
	return published
}

function procCpuSeconds(pid) {
	try {
		const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(')').pop().trim().split(/\s+/)
		return (Number(fields[11]) + Number(fields[12])) / 100 // USER_HZ, 100 on Linux
	} catch {
		return 0
	}
}

function parseInfo(text) {
	const out = {}
	for (const line of text.split(/\r?\n/)) {
		const i = line.indexOf(':')
		if (i > 0 && !line.startsWith('#')) out[line.slice(0, i)] = line.slice(i + 1)
	}
	return out
}

function commandstats(text) {
	const calls = {}
	for (const [key, value] of Object.entries(parseInfo(text))) {
		if (key.startsWith('cmdstat_')) calls[key.slice(8)] = Number(/calls=(\d+)/.exec(value)[1])
	}
	return calls
}

async function scanDelete(redis, pattern, keep = () => true) {
	let cursor = '0'
	do {
		const [nextCursor, keys] = await redis.scan(cursor, 'MATCH', pattern, 'COUNT', 2000)
		cursor = nextCursor
		const mine = keys.filter(keep)
		for (let i = 0; i < mine.length; i += 1000) await redis.del(...mine.slice(i, i + 1000))
	} while (cursor !== '0')
}

async function drop(redis, queue, runIds) {
	// The original's keys carry no prefix; remove this pass's queue and its runs' keys.
	await scanDelete(redis, `bull:${queue}:*`)
	const ids = new Set(runIds)
	const ofPass = (key) => key.split(':').some((part) => ids.has(part))
	await scanDelete(redis, 'workflow:*', ofPass)
	await scanDelete(redis, 'flowcraft:*', ofPass)
}

const median = (xs) => {
	const m = xs.length >> 1
	return xs.length % 2 ? xs[m] : (xs[m - 1] + xs[m]) / 2
}
const round = (x, digits) => Number(x.toFixed(digits))

async function throughput(a, shape, workers) {
	const queue = `fc-orig-bench-${randomUUID().slice(0, 8)}`
	const redis = driverClient(a)
	const client = driverAdapter(a, redis, queue)
	let procs
	let runIds = []
	let t0
	let published
	let cpuBefore
	let cpuAfter
	let stats
	try {
		procs = await Workers.start(a, queue, workers)
		const redisPid = Number(parseInfo(await redis.info('server')).process_id)
		// Created while the queue is paused, so the driver's own work does not compete
		// with the workers; resuming the queue releases every run at once.
		await client.queue.pause()
		runIds = await startRuns(client, shape, a.runs)
		await sleep(500)
		await redis.config('RESETSTAT')
		cpuBefore = [...(await procs.cpu()), procCpuSeconds(redisPid)]
		t0 = now()
		await client.queue.resume()
		published = await waitPublished(redis, shape, runIds, 300)
		cpuAfter = [...(await procs.cpu()), procCpuSeconds(redisPid)]
		stats = commandstats(await redis.info('commandstats'))
	} finally {
		await procs?.stop()
		await client.close()
		await drop(redis, queue, runIds)
		await redis.quit()
	}
	const latencies = runIds.map((r) => published.get(r) - t0).sort((x, y) => x - y)
	const last = Math.max(...published.values())
	const jobs = a.runs * NODES[shape]
	const elapsed = last - t0
	const ignored = new Set(['info', 'config|resetstat', 'mget', 'client|setname', 'client|setinfo'])
	const serverCmds = Object.entries(stats).reduce((n, [k, v]) => (ignored.has(k) ? n : n + v), 0)
	const workerCpu = cpuAfter.slice(0, -1).map((v, i) => v - cpuBefore[i])
	return {
		shape,
		nodes: NODES[shape],
		workers,
		runs: a.runs,
		concurrency: a.concurrency,
		elapsed_s: round(elapsed, 3),
		node_jobs_per_s: round(jobs / elapsed, 1),
		runs_per_s: round(a.runs / elapsed, 1),
		p50_latency_ms: round(1000 * median(latencies), 1),
		p95_latency_ms: round(1000 * latencies[Math.floor(0.95 * (latencies.length - 1))], 1),
		server_cmds_per_node_job: round(serverCmds / jobs, 2),
		worker_cpu_s: workerCpu.map((v) => round(v, 2)),
		worker_cpu_ms_per_node_job: round((1000 * workerCpu.reduce((x, y) => x + y, 0)) / jobs, 3),
		redis_cpu_s: round(cpuAfter.at(-1) - cpuBefore.at(-1), 2),
	}
}

async function monitored(a, shape, runs) {
	const queue = `fc-orig-bench-${randomUUID().slice(0, 8)}`
	const redis = driverClient(a)
	const client = driverAdapter(a, redis, queue)
	const lines = []
	let procs
	let monitor
	let runIds = []
	let clients
	try {
		procs = await Workers.start(a, queue, 1)
		monitor = await redis.monitor()
		monitor.on('monitor', (_time, args, source) => lines.push([source, String(args[0]).toLowerCase()]))
		await sleep(500)
		runIds = await startRuns(client, shape, runs)
		await waitPublished(redis, shape, runIds, 300)
		clients = await redis.client('LIST')
	} finally {
		monitor?.disconnect()
		await procs?.stop()
		await client.close()
		await drop(redis, queue, runIds)
		await redis.quit()
	}
	const names = new Map()
	for (const line of clients.split('\n')) {
		const addr = /\baddr=(\S+)/.exec(line)?.[1]
		const name = /\bname=(\S*)/.exec(line)?.[1]
		if (addr) names.set(addr, name)
	}
	const workerNames = new Set([WORKER_NAME, `bull:${Buffer.from(queue).toString('base64')}`])
	const outside = {}
	let inside = 0
	let workerInside = 0
	let others = 0
	let lastClient = null
	for (const [source, command] of lines) {
		if (source === 'lua') {
			inside += 1
			if (lastClient !== DRIVER_NAME) workerInside += 1
			continue
		}
		const name = names.get(source)
		lastClient = name
		if (name === DRIVER_NAME) continue
		outside[command] = (outside[command] ?? 0) + 1
		if (!workerNames.has(name)) others += 1
	}
	const clientTotal = Object.values(outside).reduce((x, y) => x + y, 0)
	const jobs = runs * NODES[shape]
	return {
		shape,
		runs,
		concurrency: a.concurrency,
		client_cmds_per_node_job: round(clientTotal / jobs, 2),
		in_script_cmds_per_node_job: round(inside / jobs, 2),
		worker_in_script_cmds_per_node_job: round(workerInside / jobs, 2),
		client_cmds: Object.fromEntries(Object.entries(outside).sort((x, y) => y[1] - x[1])),
		client_cmds_total: clientTotal,
		in_script_total: inside,
		worker_in_script_total: workerInside,
		other_client_cmds_total: others, // from connections neither the driver's nor the workers'
	}
}

function version(pkg) {
	try {
		return JSON.parse(readFileSync(new URL(`./node_modules/${pkg}/package.json`, import.meta.url), 'utf8')).version
	} catch {
		return null
	}
}

function tableLine(row) {
	return [
		row.shape.padEnd(8),
		`workers=${row.workers}`,
		`conc=${row.concurrency}`,
		`runs=${row.runs}`,
		`node_jobs/s=${row.node_jobs_per_s.toFixed(1).padStart(7)}`,
		`runs/s=${row.runs_per_s.toFixed(1).padStart(6)}`,
		`p50=${row.p50_latency_ms.toFixed(0).padStart(5)}ms`,
		`p95=${row.p95_latency_ms.toFixed(0).padStart(5)}ms`,
		`worker_cpu_s=[${row.worker_cpu_s.join(', ')}]`,
		`cpu_ms/job=${row.worker_cpu_ms_per_node_job.toFixed(3)}`,
		`server_cmds/job=${row.server_cmds_per_node_job}`,
		`redis_cpu_s=${row.redis_cpu_s}`,
	].join('  ')
}

function costLine(row) {
	return [
		`cost ${row.shape.padEnd(8)}`,
		`runs=${row.runs}`,
		`client_cmds/job=${row.client_cmds_per_node_job}`,
		`in_script/job=${row.in_script_cmds_per_node_job}`,
		`(workers' scripts only ${row.worker_in_script_cmds_per_node_job})`,
		`top: ${Object.entries(row.client_cmds).slice(0, 6).map(([k, v]) => `${k}=${v}`).join(' ')}`,
	].join('  ')
}

async function main(a) {
	const probe = new Redis(a.url, { connectionName: DRIVER_NAME, lazyConnect: true })
	await probe.connect()
	const server = parseInfo(await probe.info('server'))
	await probe.quit()
	const report = {
		engine: 'original',
		machine: { cpus: os.cpus().length, node: process.version, redis: server.redis_version },
		versions: {
			flowcraft: version('flowcraft'),
			'@flowcraft/bullmq-adapter': version('@flowcraft/bullmq-adapter'),
			bullmq: version('bullmq'),
			ioredis: version('ioredis'),
		},
		settings: {
			concurrency: a.concurrency,
			shipped_concurrency: SHIPPED_CONCURRENCY,
			remove_on_complete: a['remove-on-complete'],
			logger: 'NullLogger',
		},
		throughput: [],
		cost: [],
	}
	const say = (line) => {
		if (!a.json) process.stderr.write(`${line}\n`)
	}
	for (const shape of a.shapes.split(',').filter(Boolean)) {
		if (!(shape in NODES)) throw new Error(`unknown shape '${shape}'`)
		for (const workers of a.workers.split(',').map(Number)) {
			const row = await throughput(a, shape, workers)
			report.throughput.push(row)
			say(tableLine(row))
		}
	}
	if (!a['no-monitor']) {
		const costs = {}
		for (const shape of ['chain', 'chain20', 'diamond']) {
			costs[shape] = await monitored(a, shape, a['cost-runs'])
			report.cost.push(costs[shape])
			say(costLine(costs[shape]))
		}
		const per = a['cost-runs'] * 10
		report.marginal_client_cmds_per_chain_job = round((costs.chain20.client_cmds_total - costs.chain.client_cmds_total) / per, 2)
		report.marginal_in_script_cmds_per_chain_job = round((costs.chain20.in_script_total - costs.chain.in_script_total) / per, 2)
		say(`marginal per non-join chain job: client_cmds=${report.marginal_client_cmds_per_chain_job}  in_script=${report.marginal_in_script_cmds_per_chain_job}`)
	}
	return report
}

const { values: args } = parseArgs({
	options: {
		url: { type: 'string' },
		runs: { type: 'string', default: '200' },
		'cost-runs': { type: 'string', default: '200' },
		concurrency: { type: 'string', default: '32' },
		shapes: { type: 'string', default: 'chain,diamond' },
		workers: { type: 'string', default: '1,2' },
		json: { type: 'boolean', default: false },
		'no-monitor': { type: 'boolean', default: false },
		'remove-on-complete': { type: 'boolean', default: false },
		worker: { type: 'boolean', default: false },
		queue: { type: 'string' },
	},
})
args.url ??= process.env.FLOWCRAFT_TEST_REDIS_URL
if (!args.url) {
	console.error('bench.mjs: give --url redis://HOST:PORT/DB (or set FLOWCRAFT_TEST_REDIS_URL)')
	process.exit(2)
}
args.runs = Number(args.runs)
args['cost-runs'] = Number(args['cost-runs'])
args.concurrency = Number(args.concurrency)

if (args.worker) {
	await workerMain(args)
} else {
	try {
		const report = await main(args)
		process.stdout.write(`${JSON.stringify(report, null, args.json ? undefined : 2)}\n`)
	} catch (err) {
		console.error(`bench.mjs: FAILED: ${err.stack ?? err}`)
		process.exit(1)
	}
}
