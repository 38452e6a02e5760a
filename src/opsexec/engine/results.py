"""Step outputs and execution results: bounded summaries, full artefacts, a human answer.

A step's full output can be megabytes; rows stay small (≤ 10 KiB summaries, which the
database enforces) and the whole output goes to ``artifacts``. Everything is masked first:
an output is exactly where a command echoes a secret back.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from opsexec.actions.registry import ActionResult
from opsexec.safety.masking import mask_text, mask_value
from opsexec.store import Connection

SUMMARY_LIMIT_BYTES = 8 * 1024
"""Below the 10 KiB column check with room for the envelope and jsonb overhead."""

TRUNCATION_MARKER = "…[truncated]"
RESULT_TARGETS_SHOWN = 100


@dataclass(frozen=True)
class StoredOutput:
    summary: dict[str, Any]
    size_bytes: int
    content_type: str
    body: bytes


def _encode(output: Any, content_type: str) -> tuple[bytes, str]:
    """The full output as bytes: JSON for structures, UTF-8 for text, raw for binary."""
    if isinstance(output, bytes):
        return output, content_type or "application/octet-stream"
    if isinstance(output, str):
        return output.encode("utf-8"), content_type or "text/plain; charset=utf-8"
    text = json.dumps(output, ensure_ascii=False, default=str)
    return text.encode("utf-8"), content_type or "application/json"


def _truncate_text(text: str, limit: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore") + TRUNCATION_MARKER


def prepare_output(result: ActionResult) -> StoredOutput:
    """Mask, encode and summarise one action result.

    Binary output is kept raw in the artefact and shown base64 in the summary, with its
    content type, so the API can hand it back byte for byte.
    """
    output = result.output
    if isinstance(output, bytes):
        body, content_type = _encode(output, result.content_type)
        preview = base64.b64encode(body[: SUMMARY_LIMIT_BYTES // 2]).decode("ascii")
        summary: dict[str, Any] = {
            "encoding": "base64",
            "content_type": content_type,
            "data": preview,
            "truncated": len(body) > SUMMARY_LIMIT_BYTES // 2,
        }
    else:
        masked = mask_value(output) if not isinstance(output, str) else mask_text(output)
        body, content_type = _encode(masked, result.content_type)
        if len(body) <= SUMMARY_LIMIT_BYTES:
            summary = {"output": masked, "truncated": False}
        else:
            summary = {
                "output": _truncate_text(body.decode("utf-8"), SUMMARY_LIMIT_BYTES - 512),
                "truncated": True,
            }
    summary["content_type"] = content_type
    summary["size_bytes"] = len(body)
    if result.summary:
        summary["answer"] = _truncate_text(mask_text(result.summary), 512)
    return StoredOutput(summary=summary, size_bytes=len(body), content_type=content_type, body=body)


async def store_artifact(
    connection: Connection,
    *,
    tenant_id: UUID,
    execution_id: UUID,
    step_id: UUID,
    output: StoredOutput,
) -> str:
    """Keep the full output; return the ``output_ref`` the step row points at."""
    artifact_id: UUID = await connection.fetchval(
        """INSERT INTO artifacts (tenant_id, execution_id, step_id, content_type, size_bytes,
                                  sha256, content)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           RETURNING id""",
        tenant_id,
        execution_id,
        step_id,
        output.content_type,
        output.size_bytes,
        hashlib.sha256(output.body).hexdigest(),
        output.body,
    )
    return f"artifact:{artifact_id}"


def execution_result(steps: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    """The execution's ``result_summary``: counts, per-target outcome, a short answer."""
    counts = Counter(step["status"] for step in steps)
    outcomes: dict[str, str] = {}
    for step in steps:
        key = f"{step['step_key']}@{step['target_ref']}" if step["target_ref"] else step["step_key"]
        outcomes[key] = step["status"]
    shown = dict(list(outcomes.items())[:RESULT_TARGETS_SHOWN])
    answer = "; ".join(a for a in answers if a) or _default_answer(counts, len(steps))
    return {
        "answer": _truncate_text(mask_text(answer), 2048),
        "steps": {"total": len(steps), **dict(counts)},
        "targets": shown,
        "targets_truncated": len(outcomes) > len(shown),
    }


def _default_answer(counts: Counter[str], total: int) -> str:
    done = counts.get("succeeded", 0)
    if done == total:
        return f"all {total} steps succeeded"
    parts = [f"{n} {status}" for status, n in sorted(counts.items())]
    return f"{total} steps: " + ", ".join(parts)
