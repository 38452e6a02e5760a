"""Duplicate submits answered per second over HTTP with 8 concurrent clients (R-IDEM).

A browser refresh or a retrying client re-sends the same plan; each repeat must find the
live execution through the idempotency check and answer 200 with it. Target ≥ 1,000/s
(the original design asked for 100/s).

    .venv/bin/python bench/submit.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio

import httpx

from _harness import percentile, report, run_clients, running_service, scratch_database

PLAN = {
    "steps": [
        {
            "id": "run",
            "action": "shell.run",
            "targets": ["local-01"],
            "inputs": {"command": "echo bench"},
            "estimated_duration_s": 1,
        }
    ]
}
ASSET = {"name": "local-01", "address": "127.0.0.1", "transport": "local"}


async def main(seconds: float, clients: int) -> None:
    async with scratch_database() as dsn:
        with running_service(dsn, "--worker-concurrency", "0") as service:
            headers = {"Authorization": f"Bearer {service.api_key}"}
            async with httpx.AsyncClient(base_url=service.url, headers=headers) as http:
                (await http.post("/v1/assets", json=ASSET)).raise_for_status()
                first = await http.post("/v1/executions", json={"plan": PLAN})
                assert first.status_code == 201, first.text

            async def duplicate(client: httpx.AsyncClient) -> None:
                response = await client.post(
                    f"{service.url}/v1/executions", json={"plan": PLAN}, headers=headers
                )
                assert response.status_code == 200, response.text

            count, latencies = await run_clients(clients, seconds, duplicate)
    rate = count / seconds
    report(
        f"duplicate submits, {clients} clients, {seconds:g} s ({count} requests)",
        [
            ("duplicate submits/s (target 1,000)", rate, 1000.0),
            ("duplicate submits/s (original target 100)", rate, 100.0),
        ],
    )
    print(
        f"latency p50 {percentile(latencies, 0.5):.1f} ms, p95 {percentile(latencies, 0.95):.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.clients))
