"""In-memory runtime benchmark: what the engine itself costs per node.

    uv run python benchmarks/bench_runtime.py            # table
    uv run python benchmarks/bench_runtime.py --json     # one JSON object
    uv run python benchmarks/bench_runtime.py --shapes chain-1k,fan-out-1k --reps 3

Nodes are trivial async functions (``return ctx.input`` or a constant), so the
figures are the runtime's overhead: scheduling, input resolution, commit, routing,
joins. Each blueprint (and its runtime) is built once, outside the timed region;
each shape gets one warm-up run, then the median of several timed repetitions.
Peak memory is measured in a separate pass under ``tracemalloc`` so tracing does
not distort the timings.

Columns: ``us/node`` is the wall-clock median divided by the node activations of
one repetition (the figure compared with the original's); ``cpu us`` is the same
from this process's CPU time, which other work on a shared machine disturbs less;
``best cpu`` is the fastest repetition's CPU time per node.

Flatness (per-node cost of the chain sizes, max/min) is printed from all three,
and measured on its own in paired rounds, which give the verdict: each round runs
every chain size for the same budget of node activations (chain-100 1,000 times,
chain-100k once), back to back; the verdict is max/min of the sizes' median CPU
per node over the rounds. Each round's own max/min is printed too (with four noisy
figures per round it runs higher than the ratio of medians). Sizes measured one
after another (the table) do not share the machine's conditions: on a shared
2-core VM the same code's speed moves by up to 2x for seconds at a time (seen:
chain-100's median at 1.9x its minimum within one process), so a size measured in
a slow spell looks costly. Pairing within a round compares sizes under the same
conditions.

Shapes (the first four are the original TypeScript flowcraft's benchmark shapes):

  chain-1k        a chain of 1,000 nodes
  fan-out-1k      one start node, 1,000 parallel nodes, an ``all`` join
  runs-seq-1k     1,000 runs of a 10-node chain, one after another
  runs-gather-1k  the same 1,000 runs at once (asyncio.gather)
  chain-100, chain-4k, chain-10k, chain-100k   per-node cost against graph size
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from flowcraft import Flow, FlowRuntime, NodeContext, RunStatus, WorkflowBlueprint, WorkflowResult

# The original's figures (us/node) on this machine; None: no figure; "refused": it
# stops runs longer than 10,000 steps.
ORIGINAL_US_PER_NODE: dict[str, float | str | None] = {
    "chain-1k": 91.0,
    "fan-out-1k": 150.0,
    "runs-seq-1k": 14.0,
    "runs-gather-1k": 32.0,
    "chain-100": None,
    "chain-4k": 304.0,
    "chain-10k": None,
    "chain-100k": "refused",
}

FLAT_SHAPES = ("chain-100", "chain-4k", "chain-10k", "chain-100k")
FLAT_LIMIT = 1.3
FLAT_BUDGET = 400_000  # node activations timed per chain size
FLAT_ROUND_BUDGET = 100_000  # node activations per chain size per paired round


async def passthrough(ctx: NodeContext) -> Any:
    return ctx.input


async def constant(ctx: NodeContext) -> Any:
    return 1


REGISTRY = {"pass": passthrough, "const": constant}


def chain(n: int) -> WorkflowBlueprint:
    flow = Flow(f"chain-{n}").node("n0", "const")
    for i in range(1, n):
        flow.node(f"n{i}", "pass").edge(f"n{i - 1}", f"n{i}")
    return flow.to_blueprint()


def fan_out(width: int) -> WorkflowBlueprint:
    flow = Flow(f"fan-out-{width}").node("start", "const").node("join", "const")
    for i in range(width):
        flow.node(f"w{i}", "pass").edge("start", f"w{i}").edge(f"w{i}", "join")
    return flow.to_blueprint()


@dataclass(slots=True)
class Shape:
    name: str
    description: str
    nodes: int  # node activations per timed repetition
    reps: int
    make: Callable[[], Callable[[], Awaitable[None]]]


def _check(result: WorkflowResult) -> None:
    if result.status is not RunStatus.COMPLETED:
        raise RuntimeError(f"benchmark run ended {result.status}: {result.errors}")


def single_run(
    blueprint: Callable[[], WorkflowBlueprint],
) -> Callable[[], Callable[[], Awaitable[None]]]:
    def make() -> Callable[[], Awaitable[None]]:
        bp = blueprint()
        runtime = FlowRuntime(registry=REGISTRY)

        async def once() -> None:
            _check(await runtime.run(bp))

        return once

    return make


def many_runs(
    count: int, length: int, *, concurrent: bool
) -> Callable[[], Callable[[], Awaitable[None]]]:
    def make() -> Callable[[], Awaitable[None]]:
        bp = chain(length)
        runtime = FlowRuntime(registry=REGISTRY)

        async def sequential() -> None:
            for _ in range(count):
                _check(await runtime.run(bp))

        async def gathered() -> None:
            for result in await asyncio.gather(*(runtime.run(bp) for _ in range(count))):
                _check(result)

        return gathered if concurrent else sequential

    return make


def shapes(reps: int) -> list[Shape]:
    return [
        Shape("chain-1k", "chain of 1,000 nodes", 1000, reps, single_run(lambda: chain(1000))),
        Shape(
            "fan-out-1k",
            "1 -> 1,000 parallel -> all-join",
            1002,
            reps,
            single_run(lambda: fan_out(1000)),
        ),
        Shape(
            "runs-seq-1k",
            "1,000 runs of a 10-node chain, in sequence",
            10_000,
            reps,
            many_runs(1000, 10, concurrent=False),
        ),
        Shape(
            "runs-gather-1k",
            "1,000 runs of a 10-node chain, at once",
            10_000,
            reps,
            many_runs(1000, 10, concurrent=True),
        ),
        *(
            chain_shape(label, n, reps)
            for label, n in (("100", 100), ("4k", 4000), ("10k", 10_000), ("100k", 100_000))
        ),
    ]


def chain_shape(label: str, n: int, reps: int) -> Shape:
    """A chain size of the flatness series: all get the same activation budget."""
    return Shape(
        f"chain-{label}",
        f"chain of {n:,} nodes",
        n,
        max(reps, FLAT_BUDGET // n),
        single_run(lambda: chain(n)),
    )


@dataclass(slots=True)
class Figures:
    shape: str
    description: str
    nodes: int
    reps: int
    median_ms: float
    min_ms: float
    us_per_node: float
    cpu_us_per_node: float
    best_cpu_us_per_node: float
    nodes_per_s: float
    peak_mb: float | None
    original_us_per_node: float | str | None
    ratio_to_original: float | None


async def measure(shape: Shape, *, memory: bool) -> Figures:
    work = shape.make()  # build the blueprint and runtime: not timed
    await work()  # warm-up (also computes and caches the graph analysis)
    times: list[float] = []
    cpu_times: list[float] = []
    # One collection before the timed loop, not one per repetition: a full
    # collection right before a short run leaves the caches cold and more than
    # doubles the figure for small graphs (a harness artefact, not engine cost).
    gc.collect()
    for _ in range(shape.reps):
        cpu_start = time.process_time()
        start = time.perf_counter()
        await work()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    cpu_median = statistics.median(cpu_times)
    peak_mb = None
    if memory:
        gc.collect()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            await work()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        peak_mb = (peak - base) / 1e6
    us = median / shape.nodes * 1e6
    original = ORIGINAL_US_PER_NODE.get(shape.name)
    return Figures(
        shape.name,
        shape.description,
        shape.nodes,
        shape.reps,
        round(median * 1000, 3),
        round(min(times) * 1000, 3),
        round(us, 2),
        round(cpu_median / shape.nodes * 1e6, 2),
        round(min(cpu_times) / shape.nodes * 1e6, 2),
        round(shape.nodes / median),
        round(peak_mb, 2) if peak_mb is not None else None,
        original,
        round(us / original, 3) if isinstance(original, float) else None,
    )


FLATNESS_FIGURES: dict[str, Callable[[Figures], float]] = {
    "wall": lambda r: r.us_per_node,
    "cpu": lambda r: r.cpu_us_per_node,
    "best cpu": lambda r: r.best_cpu_us_per_node,
}


def flatness(results: list[Figures], figure: str = "best cpu") -> float | None:
    per_node = [FLATNESS_FIGURES[figure](r) for r in results if r.shape in FLAT_SHAPES]
    if len(per_node) < 2:
        return None
    return round(max(per_node) / min(per_node), 3)


def table(results: list[Figures]) -> str:
    head = (
        f"{'shape':<15} {'nodes':>7} {'reps':>4} {'median ms':>10} {'us/node':>8} {'cpu us':>7} "
        f"{'best cpu':>8} {'nodes/s':>9} {'peak MB':>8} {'original':>9} {'ratio':>6}  verdict"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        orig = r.original_us_per_node
        orig_text = "-" if orig is None else orig if isinstance(orig, str) else f"{orig:g}"
        ratio = "-" if r.ratio_to_original is None else f"{r.ratio_to_original:.2f}"
        if isinstance(orig, float):
            verdict = "at/under" if r.us_per_node <= orig else "OVER"
        elif orig == "refused":
            verdict = "runs (original refuses)"
        else:
            verdict = ""
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"
        lines.append(
            f"{r.shape:<15} {r.nodes:>7} {r.reps:>4} {r.median_ms:>10.1f} {r.us_per_node:>8.2f} "
            f"{r.cpu_us_per_node:>7.2f} {r.best_cpu_us_per_node:>8.2f} "
            f"{r.nodes_per_s:>9,} {peak:>8} {orig_text:>9} {ratio:>6}  {verdict}"
        )
    lines.append("")
    for label in FLATNESS_FIGURES:
        flat = flatness(results, label)
        if flat is not None:
            verdict = "flat" if flat <= FLAT_LIMIT else "NOT flat"
            lines.append(
                f"per-node cost across chain sizes, {label:>8} (max/min): {flat:.2f}x "
                f"(target <= {FLAT_LIMIT}x: {verdict})"
            )
    return "\n".join(lines)


@dataclass(slots=True)
class PairedFlatness:
    rounds: int
    ratio: float  # max/min of the sizes' median CPU per node: the verdict
    median_round_ratio: float
    round_ratios: list[float]
    median_cpu_us_per_node: dict[str, float]


async def paired_flatness(rounds: int) -> PairedFlatness:
    """Chain sizes back to back in each round; max/min CPU per node per round."""
    sizes = {name: int(name.removeprefix("chain-").replace("k", "000")) for name in FLAT_SHAPES}
    runs: dict[str, Callable[[], Awaitable[None]]] = {}
    for name, n in sizes.items():
        runs[name] = single_run(functools.partial(chain, n))()
        await runs[name]()  # warm-up
    gc.collect()
    rows: list[dict[str, float]] = []
    for r in range(rounds):
        row: dict[str, float] = {}
        for name in sizes if r % 2 == 0 else reversed(sizes):  # alternate to cancel drift
            reps = max(1, FLAT_ROUND_BUDGET // sizes[name])
            start = time.process_time()
            for _ in range(reps):
                await runs[name]()
            row[name] = (time.process_time() - start) / (reps * sizes[name]) * 1e6
        rows.append(row)
    ratios = [max(row.values()) / min(row.values()) for row in rows]
    medians = {name: statistics.median(row[name] for row in rows) for name in sizes}
    return PairedFlatness(
        rounds,
        round(max(medians.values()) / min(medians.values()), 3),
        round(statistics.median(ratios), 3),
        [round(x, 3) for x in ratios],
        {name: round(v, 2) for name, v in medians.items()},
    )


def paired_lines(paired: PairedFlatness) -> str:
    verdict = "flat" if paired.ratio <= FLAT_LIMIT else "NOT flat"
    sizes = ", ".join(f"{k} {v:.2f}" for k, v in paired.median_cpu_us_per_node.items())
    spread = f"{min(paired.round_ratios):.2f}-{max(paired.round_ratios):.2f}x"
    return (
        f"paired rounds ({paired.rounds}): median CPU us/node {sizes}; each round's "
        f"max/min: median {paired.median_round_ratio:.2f}x, {spread}\n"
        f"per-node cost across chain sizes, paired (max/min of medians): {paired.ratio:.2f}x "
        f"(target <= {FLAT_LIMIT}x: {verdict}; the verdict)"
    )


async def run_all(selected: list[Shape], *, memory: bool, verbose: bool) -> list[Figures]:
    results = []
    for shape in selected:
        if verbose:
            print(f"running {shape.name} ...", file=sys.stderr, flush=True)
        results.append(await measure(shape, memory=memory))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per shape")
    parser.add_argument("--shapes", help="comma-separated shape names (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument(
        "--rounds", type=int, default=12, help="paired flatness rounds (0: skip that pass)"
    )
    args = parser.parse_args(argv)
    all_shapes = shapes(args.reps)
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = set(wanted) - {s.name for s in all_shapes}
        if unknown:
            parser.error(f"unknown shapes: {', '.join(sorted(unknown))}")
        all_shapes = [s for s in all_shapes if s.name in wanted]
    results = asyncio.run(run_all(all_shapes, memory=not args.no_memory, verbose=not args.json))
    paired = asyncio.run(paired_flatness(args.rounds)) if args.rounds > 0 else None
    if args.json:
        print(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "results": [asdict(r) for r in results],
                    "flatness_wall": flatness(results, "wall"),
                    "flatness_cpu": flatness(results, "cpu"),
                    "flatness_best_cpu": flatness(results, "best cpu"),
                    "flatness_paired": asdict(paired) if paired else None,
                },
                indent=2,
            )
        )
    else:
        print(f"Python {platform.python_version()} on {platform.machine()}")
        print(table(results))
        if paired is not None:
            print(paired_lines(paired))
    return 0


if __name__ == "__main__":
    sys.exit(main())
