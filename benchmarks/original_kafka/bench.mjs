// The ORIGINAL TypeScript flowcraft (npm `flowcraft` 2.10.1) with its Kafka adapter
// (`@flowcraft/kafka-adapter` 1.4.4: kafkajs, cassandra-driver, ioredis), on the
// workload of benchmarks/bench_kafka.py, against the same Kafka, Cassandra and Redis.
//
//     npm ci --prefix benchmarks/original_kafka
//     node benchmarks/original_kafka/bench.mjs --kafka 127.0.0.1:9092 \
//         --cassandra 127.0.0.1:9042 --redis redis://127.0.0.1:6379/0 \
//         [--runs 200] [--shapes chain,diamond] [--workers 1,2] [--partitions 8]
//
// Flows as in _workloads.py: `chain` (10 nodes) and `diamond` (start, 16 parallel
// nodes, an `all` join, end). Workers are forked processes, each one KafkaAdapter
// after start(). As the adapter ships, a worker handles one message at a time per
// partition (kafkajs `partitionsConsumedConcurrently: 1`), messages are keyed by run id
// (a run's jobs share a partition) and the consumer starts at the latest offset
// (`fromBeginning: false`), so the driver waits until every worker has joined the
// group before starting runs. The original has no client start-run call: the driver
// writes the run's context row ({"blueprintVersion": null}, which the worker's version
// check needs) and produces the start jobs as the adapter does (key = run id).
// A run is finished when its row in the status table says completed or failed; a
// subclass stamps `publishedAt` into the published result (no extra request).
// Reported per pass: node_jobs_per_s = runs x nodes / (last publication - first start),
// p50/p95 latency (publication - start), worker CPU per node job, and runs not
// finished within --timeout seconds (runs it loses).

import { fork } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import os from 'node:os'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

import { KafkaAdapter, RedisCoordinationStore } from '@flowcraft/kafka-adapter'
import cassandra from 'cassandra-driver'
import { createFlow, NullLogger } from 'flowcraft'
import Redis from 'ioredis'
import { Kafka, logLevel } from 'kafkajs'

const SCRIPT = fileURLToPath(import.meta.url)
const first = () => ({ output: 1 })
const next = (ctx) => ({ output: ctx.input + 1 })
const sum = (ctx) => ({ output: Object.values(ctx.input).reduce((a, b) => a + b, 0) })

function chain(n) {
	const flow = createFlow('chain').node('n0', first)
	for (let i = 1; i < n; i++) flow.node(`n${i}`, next).edge(`n${i - 1}`, `n${i}`)
	return flow
}

function diamond(width = 16) {
	const inputs = Object.fromEntries(Array.from({ length: width }, (_, i) => [`b${i}`, `b${i}`]))
	const flow = createFlow('diamond')
		.node('start', first)
		.node('join', sum, { inputs, config: { joinStrategy: 'all' } })
		.node('end', next)
	for (let i = 0; i < width; i++) flow.node(`b${i}`, next).edge('start', `b${i}`).edge(`b${i}`, 'join')
	return flow.edge('join', 'end')
}

const FLOWS = { chain: chain(10), diamond: diamond() }
const NODES = { chain: 10, diamond: 19 }
const START = { chain: ['n0'], diamond: ['start'] }
const BLUEPRINTS = Object.fromEntries(Object.entries(FLOWS).map(([k, f]) => [k, f.toBlueprint()]))
const REGISTRY = Object.assign({}, ...Object.values(FLOWS).map((f) => Object.fromEntries(f.getFunctionRegistry())))
const now = () => (performance.timeOrigin + performance.now()) / 1000
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

function clients(a) {
	const kafka = new Kafka({ clientId: 'fc-orig', brokers: [a.kafka], logLevel: logLevel.NOTHING })
	const [host, port] = a.cassandra.split(':')
	const cql = new cassandra.Client({
		contactPoints: [host],
		protocolOptions: { port: Number(port) },
		localDataCenter: 'datacenter1',
	})
	return { kafka, cql }
}

class StampedAdapter extends KafkaAdapter {
	async publishFinalResult(runId, result) {
		return super.publishFinalResult(runId, { ...result, publishedAt: now() })
	}
}

async function workerMain(a) {
	const { kafka, cql } = clients(a)
	const redis = new Redis(a.redis)
	const adapter = new StampedAdapter({
		runtimeOptions: { blueprints: BLUEPRINTS, registry: REGISTRY, logger: new NullLogger() },
		coordinationStore: new RedisCoordinationStore(redis),
		kafka,
		cassandraClient: cql,
		keyspace: a.keyspace,
		contextTableName: 'ctx',
		statusTableName: 'status',
		topicName: a.topic,
		groupId: a.topic,
	})
	const joined = new Promise((r) => adapter.consumer.on(adapter.consumer.events.GROUP_JOIN, r))
	adapter.start()
	await joined
	process.on('message', async (msg) => {
		if (msg.type === 'cpu') {
			const { user, system } = process.cpuUsage()
			process.send({ type: 'cpu', seconds: (user + system) / 1e6 })
		} else if (msg.type === 'stop') {
			await adapter.stop()
			await cql.shutdown()
			await redis.quit()
			process.send({ type: 'stopped' }, () => process.exit(0))
		}
	})
	process.send({ type: 'ready' })
}

function reply(child, type) {
	return new Promise((resolve, reject) => {
		const onMessage = (msg) => {
			if (msg.type === type) {
				child.off('message', onMessage)
				resolve(msg)
			}
		}
		child.on('message', onMessage)
		child.once('exit', (code) => reject(new Error(`worker exited (${code}) before '${type}'`)))
	})
}

async function pass(a, shape, workers) {
	const tag = randomUUID().replaceAll('-', '').slice(0, 10)
	const topic = `orig-${tag}`
	const keyspace = `orig_${tag}`
	const { kafka, cql } = clients(a)
	const admin = kafka.admin()
	await admin.connect()
	await admin.createTopics({ topics: [{ topic, numPartitions: Number(a.partitions), replicationFactor: 1 }] })
	await cql.execute(`CREATE KEYSPACE ${keyspace} WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}`)
	await cql.execute(`CREATE TABLE ${keyspace}.ctx (run_id text PRIMARY KEY, context_data text)`)
	await cql.execute(`CREATE TABLE ${keyspace}.status (run_id text PRIMARY KEY, status text, status_data text, updated_at timestamp)`)
	const argv = ['--worker', '--kafka', a.kafka, '--cassandra', a.cassandra, '--redis', a.redis, '--topic', topic, '--keyspace', keyspace]
	const procs = Array.from({ length: workers }, () => fork(SCRIPT, argv, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }))
	await Promise.all(procs.map((p) => reply(p, 'ready')))
	await sleep(3000) // the group settles (a rebalance would pause consumption)
	const cpu0 = await Promise.all(procs.map(async (p) => { const r = reply(p, 'cpu'); p.send({ type: 'cpu' }); return (await r).seconds }))
	const producer = kafka.producer()
	await producer.connect()
	const runs = Number(a.runs)
	const started = new Map()
	const ids = Array.from({ length: runs }, () => randomUUID())
	const putCtx = `INSERT INTO ${keyspace}.ctx (run_id, context_data) VALUES (?, ?)`
	await Promise.all(ids.map(async (runId) => {
		await cql.execute(putCtx, [runId, JSON.stringify({ blueprintVersion: null })], { prepare: true })
		started.set(runId, now())
		await producer.send({
			topic,
			messages: START[shape].map((nodeId) => ({ key: runId, value: JSON.stringify({ runId, blueprintId: shape, nodeId }) })),
		})
	}))
	const finished = new Map()
	let bad = 0
	const deadline = Date.now() + Number(a.timeout) * 1000
	const read = `SELECT run_id, status, status_data FROM ${keyspace}.status WHERE run_id IN ?`
	while (finished.size < runs && Date.now() < deadline) {
		await sleep(200)
		const waiting = ids.filter((r) => !finished.has(r))
		for (let i = 0; i < waiting.length; i += 100) {
			const rows = (await cql.execute(read, [waiting.slice(i, i + 100)], { prepare: true })).rows
			for (const row of rows) {
				if (row.status === 'running' || finished.has(row.run_id)) continue
				const data = JSON.parse(row.status_data)
				finished.set(row.run_id, data.publishedAt)
				bad += row.status !== 'completed'
			}
		}
	}
	const cpu1 = await Promise.all(procs.map(async (p) => { const r = reply(p, 'cpu'); p.send({ type: 'cpu' }); return (await r).seconds }))
	await Promise.all(procs.map(async (p) => { const r = reply(p, 'stopped'); p.send({ type: 'stop' }); await r.catch(() => {}) }))
	await producer.disconnect()
	await admin.deleteTopics({ topics: [topic] }).catch(() => {})
	await admin.disconnect()
	await cql.execute(`DROP KEYSPACE IF EXISTS ${keyspace}`).catch(() => {})
	await cql.shutdown()
	const done = [...finished.entries()]
	const t0 = Math.min(...started.values())
	const span = Math.max(...done.map(([, t]) => t)) - t0
	const lat = done.map(([r, t]) => (t - started.get(r)) * 1000).sort((x, y) => x - y)
	const jobs = done.length * NODES[shape]
	const cpu = cpu1.reduce((s, c, i) => s + c - cpu0[i], 0)
	return {
		shape, workers, runs, finished: done.length, lost: runs - done.length, failed: bad,
		seconds: Number(span.toFixed(3)),
		node_jobs_per_s: Number((jobs / span).toFixed(1)),
		p50_latency_ms: Number(lat[Math.floor(lat.length / 2)].toFixed(1)),
		p95_latency_ms: Number(lat[Math.floor(0.95 * (lat.length - 1))].toFixed(1)),
		worker_cpu_ms_per_node_job: Number(((1000 * cpu) / jobs).toFixed(3)),
	}
}

const { values: a } = parseArgs({
	options: {
		worker: { type: 'boolean' }, kafka: { type: 'string' }, cassandra: { type: 'string' },
		redis: { type: 'string' }, topic: { type: 'string' }, keyspace: { type: 'string' },
		runs: { type: 'string', default: '200' }, shapes: { type: 'string', default: 'chain,diamond' },
		workers: { type: 'string', default: '1,2' }, partitions: { type: 'string', default: '8' },
		timeout: { type: 'string', default: '600' },
	},
})

if (a.worker) {
	await workerMain(a)
} else {
	const results = []
	console.error(`${os.cpus().length} cores`)
	for (const shape of a.shapes.split(',')) {
		for (const workers of a.workers.split(',').map(Number)) {
			const r = await pass(a, shape, workers)
			console.error(JSON.stringify(r))
			results.push(r)
		}
	}
	console.log(JSON.stringify({ results }, null, 2))
	process.exit(0)
}
