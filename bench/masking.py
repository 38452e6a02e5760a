"""Log masking throughput (R-PERF "log maskings"): records/s through the real pipeline.

Each record goes Logger -> StreamHandler (to a null stream) -> MaskingFilter ->
JsonFormatter, exactly as in production. The record is an execution log line shaped like
the engine's: a formatted message, a dozen R-OBS fields, a nested step output with a list,
and one registered secret value inside the output. Correlation ids and numbers change
from record to record (a new execution every 50 lines, a different duration each line),
so the masker's string cache sees the hit rate a real worker would give it, not 100 %.

Run: ``.venv/bin/python bench/masking.py [--records N] [--profile]``. Prints a table; never
asserts on timing.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import time
import uuid
from typing import Any

from opsexec.observability.logging import JsonFormatter, MaskingFilter
from opsexec.safety.masking import REDACTED, registered_secrets

TARGET_PER_S = 50_000
ORIGINAL_TARGET_PER_S = 500
SECRET = "s3cr3t-Deploy-Pa55word-7781"


class NullStream(io.TextIOBase):
    """Swallows output but remembers the last line, to check the secret never got out."""

    last = ""

    def write(self, text: str) -> int:
        self.last = text
        return len(text)


def build_logger(stream: NullStream, *, masked: bool = True) -> logging.Logger:
    """The production pipeline, or (``masked=False``) bare stdlib logging for reference."""
    logger = logging.getLogger("opsexec.bench.masking" + ("" if masked else ".plain"))
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(stream)
    if masked:
        handler.addFilter(MaskingFilter())
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger


def records(count: int) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Pre-built (msg, args, extra) triples so the timing covers logging, not set-up."""
    out: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    exec_id = request_id = ""
    targets = [f"host-{n:02d}.prod.example.com" for n in range(3)]
    for i in range(count):
        if i % 50 == 0:  # a new execution: new correlation ids, as in a real worker
            exec_id, request_id = str(uuid.uuid4()), str(uuid.uuid4())
        step = i % 5 + 1
        extra = {
            "exec_id": exec_id,
            "tenant_id": "tenant-acme",
            "plan_hash": "9f2c1e0d4b7a6c5e8f1d2c3b4a5968776f5e4d3c2b1a09f8e7d6c5b4a3928170",
            "request_id": request_id,
            "actor_id": "user-42",
            "action": "service.restart",
            "targets": targets,
            "approval_level": 1,
            "status": "succeeded",
            "duration_ms": 117 + i % 997,
            "retries_total": i % 3,
            "worker_id": "worker-7@ops-runner-2",
            "output": {
                "exit_code": 0,
                "stdout_lines": [
                    "Stopping nginx.service",
                    f"Started nginx.service in {(i % 900) / 1000:.3f}s",
                    f"deploy hook: connected with {SECRET} to registry",
                ],
                "truncated": False,
            },
        }
        out.append(
            (
                "step %d/%d %s on %s finished: %s in %d ms",
                (step, 5, "service.restart", targets[step % 3], "succeeded", extra["duration_ms"]),
                extra,
            )
        )
    return out


def run(logger: logging.Logger, batch: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> float:
    info = logger.info
    started = time.perf_counter()
    for msg, args, extra in batch:
        info(msg, *args, extra=extra)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5, help="best of N runs is reported")
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary")
    options = parser.parse_args()

    stream = NullStream()
    logger = build_logger(stream)
    batch = records(options.records)
    with registered_secrets(SECRET):
        run(logger, batch[:2000])  # warm-up: caches, compiled patterns
        if SECRET in stream.last or REDACTED not in stream.last:
            raise SystemExit(f"masking failed, last line: {stream.last}")
        if options.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run(logger, batch)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        best = min(run(logger, batch) for _ in range(options.repeat))
        # What the interpreter's logging costs with no masking and no JSON at all: the
        # floor no masker can go below on this machine.
        plain = build_logger(NullStream(), masked=False)
        floor = min(run(plain, batch) for _ in range(options.repeat))

    per_second = options.records / best
    micros = best / options.records * 1e6
    rows = [
        ("records", f"{options.records:,}"),
        ("best of", f"{options.repeat} runs"),
        ("records/s", f"{per_second:,.0f}"),
        ("µs per record", f"{micros:.2f}"),
        ("stdlib floor µs", f"{floor / options.records * 1e6:.2f}"),
        ("target (ours)", f"{TARGET_PER_S:,}/s"),
        ("ratio vs ours", f"{per_second / TARGET_PER_S:.2f}x"),
        ("target (original)", f"{ORIGINAL_TARGET_PER_S:,}/s"),
        ("ratio vs original", f"{per_second / ORIGINAL_TARGET_PER_S:,.0f}x"),
    ]
    width = max(len(name) for name, _ in rows)
    print("log masking: Logger -> handler -> MaskingFilter -> JsonFormatter")
    print("(stdlib floor: the same records through bare logging, %(message)s, no masking)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>14}")


if __name__ == "__main__":
    main()
