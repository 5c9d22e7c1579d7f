"""The audit trail: one JSON log line per request, saying what the prompter changed, for whom, and why.

:class:`Call` travels with a request: :class:`~alignpro.server.app.Envelope` opens it (request id, start time),
:class:`~alignpro.server.limits.Admission` names the caller, the gateway fills in the alias, mode, outcome and
stage latencies, and the envelope writes the line when the response has been sent in full (a stream's last
byte included) on the ``alignpro.audit`` logger::

    {"event": "request", "request_id": "...", "key_id": "key-1a2b3c4d5e6f", "route": "/v1/chat/completions",
     "alias": "aligned", "mode": "adapter", "outcome": "rewritten", "reason": null, "cached": false,
     "original_sha256": "...", "sent_sha256": "...", "prompter_ms": 41.2, "ttft_ms": 80.3, "frozen_ms": 310.5,
     "total_ms": 352.9, "status": 200, "pid": 4711}

``outcome`` is ``rewritten`` (the frozen model got another prompt), ``kept`` (the prompter answered KEEP),
``gated`` (the gate skipped the prompter: ``prompter.gate``),
``fallback`` (the prompter failed; ``reason`` says why), ``off`` (no prompter) or null (no model was asked).
Prompts appear as SHA-256 digests of their UTF-8 text, the prompts themselves only with
``audit_log_prompts=true``. The request id is the client's ``x-request-id`` or a fresh one; it is sent
upstream (:data:`alignpro.engines.base.REQUEST_ID`), so the gateway's line and vLLM's log of the same request can be joined.
``pid`` is the gateway process that served the request: with ``alignpro serve --workers N`` it names the worker,
whose other log lines carry the same id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from alignpro.protocol import AlignProInfo

log = logging.getLogger("alignpro.audit")


def sha256(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def outcome(info: AlignProInfo) -> str:
    if info.mode == "off":
        return "off"
    if info.gated:
        return "gated"
    if info.rewritten:
        return "rewritten"
    return "kept" if info.kept else "fallback"


@dataclass
class Call:
    """One request's audit record, filled in as it goes through the gateway."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    key_id: str = "anonymous"
    alias: str | None = None
    mode: str | None = None
    outcome: str | None = None
    reason: str | None = None
    cached: bool = False
    original: str | None = None
    sent: str | None = None
    prompter_ms: float | None = None
    ttft_ms: float | None = None
    frozen_ms: float | None = None

    def since_start_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)

    def prompted(self, alias: str, info: AlignProInfo, sent: str | None) -> None:
        """Record what the prompter stage did for this request and what the frozen model is sent."""
        self.alias, self.mode, self.outcome = alias, info.mode, outcome(info)
        self.reason, self.cached = info.fallback, info.cached
        self.original, self.sent = info.original_prompt, sent
        self.prompter_ms = info.prompter_ms if info.mode != "off" else None

    def record(self, route: str, status: int, prompts: bool) -> dict[str, Any]:
        line: dict[str, Any] = {
            "event": "request",
            "request_id": self.request_id,
            "key_id": self.key_id,
            "route": route,
            "alias": self.alias,
            "mode": self.mode,
            "outcome": self.outcome,
            "reason": self.reason,
            "cached": self.cached,
            "original_sha256": sha256(self.original),
            "sent_sha256": sha256(self.sent),
            "prompter_ms": self.prompter_ms,
            "ttft_ms": self.ttft_ms,
            "frozen_ms": self.frozen_ms,
            "total_ms": self.since_start_ms(),
            "status": status,
            "pid": os.getpid(),
        }
        if prompts:
            line["original_prompt"], line["sent_prompt"] = self.original, self.sent
        return line


def write(call: Call, route: str, status: int, prompts: bool) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps(call.record(route, status, prompts), ensure_ascii=False))
