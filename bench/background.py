"""Background executions per second with 1, 2 and 4 worker processes, and the queue wait.

The work is one no-op step per execution: ``bench.noop``, a level-0, read-only, idempotent
action without targets that this script installs as a third-party plugin (a module plus a
``*.dist-info`` with an ``opsexec.actions`` entry point, on ``PYTHONPATH``) for the
`opsexec serve` that accepts the plans and for every `opsexec worker` that runs them. So
what is measured is the queue and the engine around a step, not an action.

1. Drain, per worker count K: N executions are submitted over HTTP in background mode to
   a `serve --worker-concurrency 0` and held in the queue; K fresh `opsexec worker
   --concurrency C` processes start, and once all have registered the whole backlog is
   made available at once (what an approval's release does: ``available_at = now()`` and
   a NOTIFY). The rate is N over the database's time from that release to the end of the
   last execution. Target ≥ 1,000/s; the original design asked for 100/s.
2. Steady: with K workers running, executions are submitted at a fixed rate well below
   what submitting and draining sustain together; the p95 of their
   ``executions.queue_wait_ms`` (enqueue to first lease) is the queue wait a submitter
   sees. A backlog's wait only measures the length of the backlog.

Every run is checked: each execution succeeded, its one step row succeeded, and it has
exactly one ``step_started`` event (ran once). A violation exits non-zero; timings never do.

    .venv/bin/python bench/background.py [--jobs 2000] [--concurrency 8] [--workers 1,2,4]
                                         [--seconds 10] [--rate R] [--steady-workers 2]
    .venv/bin/python bench/background.py --profile 1000    # where one worker's time goes

(Not ``bench/queue.py``: Python puts ``bench/`` first on ``sys.path`` for every script
there, so that name would shadow the standard library's ``queue`` and break the others.)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from _harness import Service, percentile, report, running_service, scratch_database

NOOP_MODULE = '''\
"""The action of bench/background.py: a step that does nothing, so the queue is measured."""

from opsexec.actions.registry import ActionClass, ActionInputs, ActionResult, ActionSpec


class NoopInputs(ActionInputs):
    pass


SPEC = ActionSpec(
    name="bench.noop",
    action_class=ActionClass.READ,
    base_level=0,
    permission="automation:execute",
    idempotent=True,
    input_model=NoopInputs,
    default_duration_s=0.1,
    description="Does nothing (bench/background.py).",
    targets="none",
)


class Noop:
    spec = SPEC

    async def run(self, ctx, target, inputs):
        return ActionResult.success({"noop": True}, summary="nothing done")


ACTION = Noop()
'''

TERMINAL = ("succeeded", "failed", "cancelled", "rejected")
WORKER_ENV = {"OPSEXEC_LOG_LEVEL": "WARNING"}
"""As `running_service` runs `serve`: a bench measures the queue, not the log sink."""


@contextmanager
def noop_plugin() -> Iterator[Path]:
    """The plugin directory: on the PYTHONPATH of the service and workers started inside,
    and on this process's ``sys.path`` for ``--profile``."""
    with tempfile.TemporaryDirectory(prefix="opsexec-bench-plugin-") as tmp:
        root = Path(tmp)
        (root / "opsexec_bench_noop.py").write_text(NOOP_MODULE)
        dist = root / "opsexec_bench_noop-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: opsexec-bench-noop\nVersion: 1.0\n"
        )
        (dist / "entry_points.txt").write_text(
            "[opsexec.actions]\nbench_noop = opsexec_bench_noop:ACTION\n"
        )
        previous = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), previous]))
        sys.path.append(str(root))  # --profile runs a worker in this process
        try:
            yield root
        finally:
            sys.path.remove(str(root))
            if previous is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = previous


def noop_plan(tag: str, n: int) -> dict[str, Any]:
    # A distinct metadata value per plan, so idempotency never merges two submissions.
    return {
        "steps": [
            {
                "id": "noop",
                "action": "bench.noop",
                "targets": [],
                "inputs": {},
                "estimated_duration_s": 1,
            }
        ],
        "metadata": {"bench": tag, "n": n},
    }


# --- processes ---------------------------------------------------------------------------


@dataclass
class Workers:
    processes: list[subprocess.Popen[bytes]]
    ids: list[str]
    logs: Path

    def cpu_s(self) -> float:
        return sum(_cpu_s(p.pid) for p in self.processes)


def start_workers(dsn: str, tag: str, count: int, concurrency: int, logs: Path) -> Workers:
    data_dir = str(logs / "worker-data")  # the worker's own master key; removed with logs
    env = {**os.environ, "OPSEXEC_DATABASE_URL": dsn, "OPSEXEC_DATA_DIR": data_dir, **WORKER_ENV}
    ids = [f"bench-{tag}-{i}" for i in range(count)]
    processes = []
    for worker_id in ids:
        with (logs / f"{worker_id}.log").open("ab") as log:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "opsexec",
                        "worker",
                        "--concurrency",
                        str(concurrency),
                        "--worker-id",
                        worker_id,
                    ],
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            )
    return Workers(processes, ids, logs)


def stop_workers(workers: Workers) -> None:
    for process in workers.processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in workers.processes:
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _serve_cpu_s() -> float:
    """CPU seconds of the `opsexec serve` this script started (it fans events out)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[1]) == os.getpid() and b"serve" in cmdline:
                return _cpu_s(int(entry.name))
    return 0.0


def _machine_ticks() -> tuple[int, int, int]:
    """Busy, total and stolen (by the hypervisor) CPU ticks of the whole machine so far."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait, steal


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def postgres_cpu_s(db: asyncpg.Pool) -> dict[int, tuple[str, float]]:
    """CPU seconds of each local PostgreSQL process, with its kind: a backend of this
    database running statements, one that only LISTENs (every NOTIFY in the database
    wakes each of them), a backend of another database (someone else's load on this
    machine), or a server process (WAL writer, checkpointer, autovacuum...). Empty when
    the server is not on this machine."""
    kinds = {}
    for row in await db.fetch(
        """SELECT pid, datname = current_database() AS here,
                  query ILIKE 'LISTEN %' AS listening
           FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname IS NOT NULL"""
    ):
        kinds[row["pid"]] = (
            "elsewhere" if not row["here"] else "listening" if row["listening"] else "statements"
        )
    return {pid: (kinds.get(pid, "server"), cpu) for pid, cpu in _postgres_processes().items()}


def _postgres_processes() -> dict[int, float]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    found[int(entry.name)] = _cpu_s(int(entry.name))
            except OSError:
                continue
    return found


def cpu_spent(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds by kind between two ``postgres_cpu_s`` snapshots (processes gone by
    ``after`` are not counted)."""
    spent = dict.fromkeys(("statements", "listening", "server", "elsewhere"), 0.0)
    for pid, (kind, seconds) in after.items():
        spent[kind] += seconds - before.get(pid, (kind, 0.0))[1]
    return spent


# --- database probes ---------------------------------------------------------------------


async def wait_until(probe: Any, what: str, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await probe():
            return True
        await asyncio.sleep(interval_s)
    print(f"!! gave up after {timeout_s:g} s waiting for {what}")
    return False


async def wait_registered(db: asyncpg.Pool, worker_ids: list[str]) -> None:
    """Until every worker of the run has its heartbeat row (it is ready to lease)."""

    async def registered() -> bool:
        up: int = await db.fetchval(
            "SELECT count(*) FROM worker_heartbeats WHERE worker_id = ANY($1::text[])",
            worker_ids,
        )
        return up == len(worker_ids)

    await wait_until(registered, f"{len(worker_ids)} workers to register", 60)


async def remember(db: asyncpg.Pool, tag: str, ids: list[uuid.UUID]) -> None:
    """Keep a run's ids in the scratch database, so polling does not ship them each time
    (thousands of uuids 20 times a second cost CPU this 2-core box lends the workers)."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS bench_batch (tag text NOT NULL, execution_id uuid NOT NULL)"
    )
    await db.copy_records_to_table("bench_batch", records=[(tag, i) for i in ids])


async def terminal_count(db: asyncpg.Pool, tag: str) -> int:
    count: int = await db.fetchval(
        """SELECT count(*) FROM bench_batch b JOIN executions e ON e.id = b.execution_id
           WHERE b.tag = $1 AND e.status = ANY($2::execution_status[])""",
        tag,
        list(TERMINAL),
    )
    return count


async def verify(db: asyncpg.Pool, ids: list[uuid.UUID], label: str) -> list[str]:
    """Each execution succeeded, its one step succeeded, and that step started once."""
    row = await db.fetchrow(
        """SELECT
             (SELECT count(*) FROM executions WHERE id = ANY($1::uuid[])
                AND status = 'succeeded') AS succeeded,
             (SELECT string_agg(status::text || ' ' || n, ', ') FROM (
                SELECT status, count(*) AS n FROM executions WHERE id = ANY($1::uuid[])
                GROUP BY 1) s) AS statuses,
             (SELECT count(*) FROM execution_steps WHERE execution_id = ANY($1::uuid[]))
                AS steps,
             (SELECT count(*) FROM execution_steps WHERE execution_id = ANY($1::uuid[])
                AND status = 'succeeded') AS steps_ok,
             (SELECT count(DISTINCT execution_id) FROM execution_events
                WHERE execution_id = ANY($1::uuid[]) AND event_kind = 'step_started')
                AS started,
             (SELECT count(*) FROM (
                SELECT 1 FROM execution_events
                WHERE execution_id = ANY($1::uuid[]) AND event_kind = 'step_started'
                GROUP BY execution_id HAVING count(*) > 1) r) AS started_twice,
             (SELECT count(*) FROM execution_queue WHERE execution_id = ANY($1::uuid[])
                AND status = 'completed') AS completed,
             (SELECT count(*) FROM execution_queue WHERE execution_id = ANY($1::uuid[])
                AND lease_count > 1) AS leased_again""",
        ids,
    )
    assert row is not None
    n = len(ids)
    problems = []
    if row["succeeded"] != n:
        problems.append(f"{label}: executions {row['statuses']}, expected {n} succeeded")
    if row["steps"] != n or row["steps_ok"] != n:
        problems.append(f"{label}: {row['steps_ok']} of {row['steps']} step rows succeeded")
    if row["started"] != n or row["started_twice"]:
        problems.append(
            f"{label}: {row['started']} of {n} executions started their step, "
            f"{row['started_twice']} more than once (step_started events)"
        )
    if row["completed"] != n:
        problems.append(f"{label}: {row['completed']} of {n} queue rows completed")
    if row["leased_again"]:  # allowed (a lost lease is re-leased), but worth a look
        print(f"note: {label}: {row['leased_again']} jobs were leased more than once")
    return problems


# --- submission --------------------------------------------------------------------------


async def post_plan(http: httpx.AsyncClient, tag: str, n: int) -> uuid.UUID:
    """Submit one no-op plan in background mode; its execution id.

    A transport error (a keep-alive connection the server closed as it was reused) is
    retried: the same plan again is answered 200 with the execution the lost attempt
    made, if it made one (idempotency), so nothing is submitted twice.
    """
    body = {"plan": noop_plan(tag, n), "mode": "background"}
    for attempt in range(3):
        try:
            response = await http.post("/v1/executions", json=body)
        except httpx.TransportError:
            if attempt == 2:
                raise
            print(f"note: submit {tag}/{n} retried after a transport error")
            continue
        assert response.status_code in (200, 201), response.text
        return uuid.UUID(response.json()["id"])
    raise AssertionError("unreachable")


async def submit_all(service: Service, tag: str, count: int, clients: int) -> list[uuid.UUID]:
    """``count`` background executions, ``clients`` requests in flight; their ids."""
    ids: list[uuid.UUID] = []
    numbers = iter(range(count))
    headers = {"Authorization": f"Bearer {service.api_key}"}

    async def loop(http: httpx.AsyncClient) -> None:
        for n in numbers:
            ids.append(await post_plan(http, tag, n))

    async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=60) as http:
        await asyncio.gather(*(loop(http) for _ in range(clients)))
    return ids


async def submit_paced(
    service: Service, tag: str, rate: float, seconds: float, max_in_flight: int = 64
) -> tuple[list[uuid.UUID], int]:
    """Submissions started at ``rate`` per second (open loop); ids, and starts skipped
    because ``max_in_flight`` requests were already waiting (the API fell behind)."""
    ids: list[uuid.UUID] = []
    headers = {"Authorization": f"Bearer {service.api_key}"}
    in_flight = asyncio.Semaphore(max_in_flight)
    skipped = 0

    async def one(http: httpx.AsyncClient, n: int) -> None:
        try:
            ids.append(await post_plan(http, tag, n))
        finally:
            in_flight.release()

    limits = httpx.Limits(max_connections=max_in_flight)
    async with httpx.AsyncClient(
        base_url=service.url, headers=headers, timeout=60, limits=limits
    ) as http:
        tasks = []
        started = time.monotonic()
        n = 0
        while (due := started + n / rate) < started + seconds:
            await asyncio.sleep(max(due - time.monotonic(), 0))
            if in_flight.locked():
                skipped += 1
            else:
                await in_flight.acquire()
                tasks.append(asyncio.create_task(one(http, n)))
            n += 1
        await asyncio.gather(*tasks)
    return ids, skipped


# --- the two measurements ----------------------------------------------------------------


@dataclass
class Drain:
    workers: int
    jobs: int
    rate: float
    submit_rate: float
    cpu_ms: dict[str, float]
    """CPU per execution by process: workers, `serve`, this script, PostgreSQL's kinds."""
    busy: float
    """Share of the machine's CPU time in use during the drain."""
    others_ms: float
    """CPU per execution of everything else on the machine: someone else's load."""
    steal_ms: float
    """CPU time per execution the hypervisor gave to other machines."""
    per_worker: dict[str, int]


async def drain(
    service: Service, db: asyncpg.Pool, count: int, workers: int, concurrency: int, logs: Path
) -> tuple[Drain, list[str]]:
    tag = f"drain{workers}"
    started = time.monotonic()
    ids = await submit_all(service, tag, count, clients=16)
    submit_rate = count / (time.monotonic() - started)
    await remember(db, tag, ids)
    # Hold the backlog until every worker is up, so K workers start together.
    held = await db.execute(
        """UPDATE execution_queue SET available_at = 'infinity'
           WHERE execution_id = ANY($1::uuid[]) AND status = 'queued'""",
        ids,
    )
    problems = [] if held == f"UPDATE {count}" else [f"{tag}: only {held} of {count} queued"]
    fleet = start_workers(service.dsn, tag, workers, concurrency, logs)
    try:
        await wait_registered(db, fleet.ids)
        await asyncio.sleep(0.3)  # past their first (empty) lease
        pg_before = await postgres_cpu_s(db)
        cpu_before = (fleet.cpu_s(), _serve_cpu_s(), time.process_time(), _machine_ticks())
        released_at = await db.fetchval(
            """WITH released AS (
                   UPDATE execution_queue SET available_at = now()
                   WHERE execution_id = ANY($1::uuid[]) AND status = 'queued' RETURNING 1)
               SELECT now() FROM released, pg_notify('opsexec_queue', '') LIMIT 1""",
            ids,
        )

        async def all_done() -> bool:
            return await terminal_count(db, tag) == count

        await wait_until(all_done, f"{count} executions to finish", max(120, count / 20))
        cpu_after = (fleet.cpu_s(), _serve_cpu_s(), time.process_time(), _machine_ticks())
        pg_cpu = cpu_spent(pg_before, await postgres_cpu_s(db))
    finally:
        stop_workers(fleet)
    last_end = await db.fetchval(
        "SELECT max(ended_at) FROM executions WHERE id = ANY($1::uuid[])", ids
    )
    per_worker: dict[str, int] = {
        row["worker_id"]: row["n"]
        for row in await db.fetch(
            """SELECT worker_id, count(*) AS n FROM executions WHERE id = ANY($1::uuid[])
               GROUP BY 1 ORDER BY 1""",
            ids,
        )
    }
    problems += await verify(db, ids, tag)
    elapsed = max((last_end - released_at).total_seconds(), 1e-3) if last_end else float("inf")
    ours = {
        "workers": cpu_after[0] - cpu_before[0],
        "serve": cpu_after[1] - cpu_before[1],
        "bench": cpu_after[2] - cpu_before[2],
        **{f"postgres {kind}": s for kind, s in pg_cpu.items() if kind != "elsewhere"},
    }
    cpu_ms = {kind: 1000 * s / count for kind, s in ours.items()}
    busy, total, steal = (
        after - before for after, before in zip(cpu_after[3], cpu_before[3], strict=True)
    )
    tick = os.sysconf("SC_CLK_TCK")
    others = busy / tick - sum(ours.values())  # other processes, other databases' backends
    return Drain(
        workers=workers,
        jobs=count,
        rate=count / elapsed,
        submit_rate=submit_rate,
        cpu_ms=cpu_ms,
        busy=busy / max(total, 1),
        others_ms=1000 * others / count,
        steal_ms=1000 * steal / tick / count,
        per_worker=per_worker,
    ), problems


@dataclass
class Steady:
    workers: int
    rate: float
    submitted: int
    skipped: int
    achieved: float
    waits: list[float]
    latencies: list[float]
    after_commit: list[float]


async def steady(
    service: Service,
    db: asyncpg.Pool,
    workers: int,
    concurrency: int,
    rate: float,
    seconds: float,
    logs: Path,
) -> tuple[Steady, list[str]]:
    tag = f"steady{workers}"
    fleet = start_workers(service.dsn, tag, workers, concurrency, logs)
    try:
        await wait_registered(db, fleet.ids)
        started = time.monotonic()
        ids, skipped = await submit_paced(service, tag, rate, seconds)
        achieved = len(ids) / (time.monotonic() - started)
        await remember(db, tag, ids)

        async def all_done() -> bool:
            return await terminal_count(db, tag) == len(ids)

        await wait_until(all_done, f"{len(ids)} executions to finish", 120)
    finally:
        stop_workers(fleet)
    # queue_wait_ms runs from queued_at, which is now(): the start of the submitting
    # transaction, while workers see the job only once it commits. The last event that
    # transaction wrote (clock_timestamp()) bounds the commit from below, so the wait up to
    # the first lease (execution_queue.started_at; leased_at is cleared on completion)
    # splits in two.
    rows = await db.fetch(
        """SELECT e.queue_wait_ms,
                  extract(epoch FROM e.ended_at - e.created_at) * 1000 AS total_ms,
                  extract(epoch FROM q.started_at - s.written_at) * 1000 AS after_commit_ms
           FROM executions e
           JOIN execution_queue q ON q.execution_id = e.id
           CROSS JOIN LATERAL (
               SELECT max(v."timestamp") AS written_at FROM execution_events v
               WHERE v.execution_id = e.id
                 AND v.event_kind IN ('execution_started', 'execution_approved')) s
           WHERE e.id = ANY($1::uuid[])""",
        ids,
    )
    problems = await verify(db, ids, tag)
    waits = [float(r["queue_wait_ms"]) for r in rows if r["queue_wait_ms"] is not None]
    if len(waits) != len(ids):
        problems.append(f"{tag}: {len(ids) - len(waits)} executions have no queue_wait_ms")
    latencies = [float(r["total_ms"]) for r in rows if r["total_ms"] is not None]
    after_commit = [float(r["after_commit_ms"]) for r in rows if r["after_commit_ms"] is not None]
    result = Steady(workers, rate, len(ids), skipped, achieved, waits, latencies, after_commit)
    return result, problems


# --- --profile: one worker in this process, its SQL counted and its CPU profiled ---------


async def profile(
    service: Service, db: asyncpg.Pool, count: int, concurrency: int, logs: Path
) -> list[str]:
    """Where one worker's time goes per execution: statements (and their round-trip time
    as the worker sees it) through an asyncpg query logger, CPU through cProfile."""
    import opsexec.store
    from opsexec.config import Settings
    from opsexec.engine.services import open_services
    from opsexec.queue.worker import Worker, WorkerOptions

    calls: Counter[str] = Counter()
    waited: defaultdict[str, float] = defaultdict(float)

    def logged(record: Any) -> None:
        text = re.sub(r"\s+", " ", record.query).strip()
        calls[text] += 1
        waited[text] += record.elapsed

    original_init = opsexec.store._init_connection

    async def init_with_logger(connection: asyncpg.Connection) -> None:
        await original_init(connection)
        connection.add_query_logger(logged)

    tag = "profile"
    ids = await submit_all(service, tag, count, clients=16)
    await remember(db, tag, ids)
    await db.execute(
        """UPDATE execution_queue SET available_at = 'infinity'
           WHERE execution_id = ANY($1::uuid[]) AND status = 'queued'""",
        ids,
    )
    settings = Settings(
        database_url=service.dsn,
        data_dir=logs / "worker-data",
        log_level="WARNING",
    )
    opsexec.store._init_connection = init_with_logger
    try:
        services = await open_services(settings)
    finally:
        opsexec.store._init_connection = original_init
    worker = Worker(
        services.db.pool,
        services.db.dsn,
        services.engine,
        WorkerOptions(concurrency=concurrency, worker_id="bench-profile"),
    )
    running = asyncio.create_task(worker.run())
    # CPU time, not wall time: on a loaded box a wall-clock profile blames whatever call
    # the scheduler happened to preempt (socket sends waking a PostgreSQL backend).
    profiler = cProfile.Profile(time.process_time)
    try:
        await asyncio.sleep(1.0)  # registered, first lease done
        calls.clear()
        waited.clear()
        profiler.enable()
        started = time.perf_counter()
        await db.execute(
            """UPDATE execution_queue SET available_at = now()
               WHERE execution_id = ANY($1::uuid[]) AND status = 'queued'""",
            ids,
        )
        await db.execute("SELECT pg_notify('opsexec_queue', '')")

        async def all_done() -> bool:
            return await terminal_count(db, tag) == count

        await wait_until(all_done, f"{count} executions to finish", max(120, count / 5))
        elapsed = time.perf_counter() - started
        profiler.disable()
    finally:
        worker.stop()
        await running
        await services.close()
    problems = await verify(db, ids, tag)
    kinds = await db.fetch(
        """SELECT event_kind, count(*) AS n FROM execution_events
           WHERE execution_id = ANY($1::uuid[]) GROUP BY 1 ORDER BY 2 DESC, 1""",
        ids,
    )

    print(
        f"\nprofile: 1 in-process worker x {concurrency}, {count} executions in {elapsed:.1f} s "
        f"({count / elapsed:.0f}/s under cProfile and the query logger)"
    )
    total_calls = sum(calls.values())
    total_wait = sum(waited.values())
    print(
        f"statements per execution: {total_calls / count:.1f}, awaited "
        f"{1000 * total_wait / count:.2f} ms per execution (sum over the {concurrency} slots)"
    )
    print(f"{'per exec':>9}{'ms/exec':>9}  statement")
    for text, n in sorted(calls.items(), key=lambda item: -item[1])[:30]:
        print(f"{n / count:>9.2f}{1000 * waited[text] / count:>9.3f}  {text[:110]}")
    print(
        "events per execution (each its own NOTIFY; submit's included): "
        + ", ".join(f"{r['event_kind']} {r['n'] / count:.1f}" for r in kinds)
    )
    for order, limit, restriction in (
        ("tottime", 25, ()),
        ("cumulative", 30, ("opsexec/",)),
    ):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(*restriction, limit)
        print(
            f"\ncProfile (CPU seconds, the bench's own poller included), by {order}"
            + (f", {restriction[0]} only:" if restriction else ":")
        )
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        print("\n".join(line for line in lines[start:] if line.strip()))
    return problems


# --- main --------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    problems: list[str] = []
    drains: list[Drain] = []
    with noop_plugin(), tempfile.TemporaryDirectory(prefix="opsexec-bench-logs-") as tmp:
        logs = Path(tmp)
        async with scratch_database() as dsn:
            with running_service(dsn, "--worker-concurrency", "0") as service:
                db = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
                assert db is not None
                try:
                    if args.profile:
                        problems += await profile(service, db, args.profile, args.concurrency, logs)
                        return report_problems(problems)
                    for workers in args.workers:
                        result, found = await drain(
                            service, db, args.jobs, workers, args.concurrency, logs
                        )
                        drains.append(result)
                        problems += found
                        print(
                            f"drain: {workers} worker(s) x {args.concurrency}: "
                            f"{result.rate:.0f} executions/s "
                            f"(submitted at {result.submit_rate:.0f}/s)",
                            flush=True,
                        )
                    # Below capacity: half of what submitting and running together can
                    # sustain when, as here, the API and the workers share the CPUs.
                    by_workers = {d.workers: d for d in drains}
                    base = by_workers.get(args.steady_workers, drains[-1])
                    both = 1 / (1 / base.rate + 1 / base.submit_rate)
                    rate = args.rate or max(5.0, round(both / 2))
                    steady_result, found = await steady(
                        service,
                        db,
                        args.steady_workers,
                        args.concurrency,
                        rate,
                        args.seconds,
                        logs,
                    )
                    problems += found
                finally:
                    await db.close()
        if problems:
            print_logs(logs)

    rows = [
        (f"executions/s, {d.workers} worker(s) x {args.concurrency} (target 1,000)", d.rate, 1000.0)
        for d in drains
    ]
    best = max(drains, key=lambda d: d.rate)
    rows.append(("best executions/s (original target 100)", best.rate, 100.0))
    s = steady_result
    report(
        f"background executions: {args.jobs} one-step no-op jobs drained per run; then "
        f"{s.achieved:.0f}/s submitted for {args.seconds:g} s to {s.workers} workers",
        rows,
    )
    label = f"p95 queue wait ms at {s.achieved:.0f}/s"
    print(f"{label:<48}{pct(s.waits, 0.95):>12.1f}{'-':>12}{'-':>8}  (no stated target)")
    print(f"\ndrain runs: CPU ms per execution, by process ({os.cpu_count()} CPUs here)")
    for d in drains:
        spread = ", ".join(str(n) for n in d.per_worker.values())
        print(
            f"  {d.workers} worker(s): {d.rate:6.1f}/s, machine {100 * d.busy:.0f}% busy; "
            f"total {sum(d.cpu_ms.values()):.2f} ("
            + ", ".join(f"{kind} {ms:.2f}" for kind, ms in d.cpu_ms.items())
            + f"); per worker {spread}; HTTP submits ran at {d.submit_rate:.0f}/s"
        )
        if d.others_ms > 0.1 * sum(d.cpu_ms.values()):
            print(
                f"    !! other processes used {d.others_ms:.2f} ms of CPU per execution "
                f"({d.steal_ms:.2f} stolen by the hypervisor) meanwhile: this figure is low"
            )
    print(
        f"steady: {s.submitted} submitted at {s.achieved:.1f}/s (asked {s.rate:g}/s; "
        f"{s.skipped} starts skipped with 64 requests waiting)\n"
        f"  queue wait (queue_wait_ms) p50 {pct(s.waits, 0.5):.1f} ms, p95 "
        f"{pct(s.waits, 0.95):.1f} ms, max {max(s.waits, default=float('nan')):.1f} ms\n"
        f"  of it after the submit committed: p50 {pct(s.after_commit, 0.5):.1f} ms, p95 "
        f"{pct(s.after_commit, 0.95):.1f} ms (the rest is the submitting transaction)\n"
        f"  submit to end of execution p50 {pct(s.latencies, 0.5):.1f} ms, p95 "
        f"{pct(s.latencies, 0.95):.1f} ms"
    )
    return report_problems(problems)


def pct(values: list[float], fraction: float) -> float:
    return percentile(values, fraction) if values else float("nan")


def print_logs(logs: Path) -> None:
    for log in sorted(logs.glob("*.log")):
        if text := log.read_text(errors="replace").strip():
            print(f"--- {log.name} (last 2,000 characters)\n{text[-2000:]}")


def report_problems(problems: list[str]) -> int:
    if problems:
        print("\nCORRECTNESS FAILURES:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("correctness: every execution succeeded and ran its step exactly once")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000, help="executions per drain run")
    parser.add_argument("--concurrency", type=int, default=8, help="--concurrency per worker")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 2, 4],
        help="worker counts for the drain runs, comma-separated",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="steady submission time")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="steady submits/s (default: half of what submit + drain sustain together)",
    )
    parser.add_argument("--steady-workers", type=int, default=2)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="JOBS",
        help="instead: drain JOBS with one in-process worker, count its SQL, cProfile it",
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
