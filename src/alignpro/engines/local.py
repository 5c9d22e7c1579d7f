"""In-process generation with transformers: the embedded default engine, also used by training and eval.

Two layers:

* :class:`Generator` is synchronous: it owns the model (plus optional LoRA adapters loaded with peft) and decodes
  a *batch* of requests together with a hand-written sampling loop over the KV cache, so that rows can have their
  own temperature, top-p, seed, stop strings and length, stream token by token, and be cancelled. Trainers and
  the evaluator call it directly.
* :class:`LocalEngine` puts it behind the async :class:`~alignpro.engines.base.Engine` interface: requests
  queue up, a single worker thread takes up to ``max_batch_size`` rows that arrived within ``batch_wait_ms`` (and
  use the same adapter), and decodes them together off the event loop. Batching is static (a batch runs to its
  end); on 2 CPU cores this already gives ~5x the tokens/s of one-by-one decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignpro import embedded
from alignpro.embedded import resolve_adapter
from alignpro.engines.base import DONE_EVENT, Engine, sse_event
from alignpro.engines.responses import ChatResponses
from alignpro.errors import ContextLengthError, InvalidRequestError, UpstreamUnavailableError
from alignpro.prompter.version import adapter_fingerprint, prompter_fingerprint, warn_if_mismatched
from alignpro.protocol import new_id
from alignpro.settings import PROMPTER_ADAPTER, TRAINED, EngineConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512  # when a request sets none; the context bound still applies


@dataclass
class GenRequest:
    """One sequence to decode."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: str | None = None
    # Called from the generation thread with each new piece of text (already stop-checked).
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False  # some text went to on_text already: a failed batch cannot re-run this row


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int


class _Rows:
    """What the rows of a batch have decoded so far: tokens, text, why each finished, what was streamed."""

    def __init__(self, reqs: list[GenRequest]) -> None:
        self.reqs = reqs
        self.out_ids: list[list[int]] = [[] for _ in reqs]
        self.texts = [""] * len(reqs)
        self.finish: list[str | None] = [None] * len(reqs)
        self.emitted = [0] * len(reqs)  # characters of text already handed to on_text
        self.hold = [max((len(s) for s in r.stop), default=1) - 1 for r in reqs]

    def all_finished(self) -> bool:
        return all(f is not None for f in self.finish)

    def emit(self, i: int) -> None:
        """Hand row ``i``'s new text to its ``on_text``, holding back a possibly-incomplete UTF-8 character and a
        possible stop-string prefix until the row finishes."""
        on_text = self.reqs[i].on_text
        if on_text is None:
            return
        text = self.texts[i]
        upto = len(text) if self.finish[i] else len(text) - self.hold[i]
        if not self.finish[i] and text.endswith("\ufffd"):
            upto = min(upto, len(text) - 1)
        if upto > self.emitted[i]:
            self.reqs[i].streamed = True
            on_text(text[self.emitted[i] : upto])
            self.emitted[i] = upto

    def results(self) -> list[GenResult]:
        return [
            GenResult(self.texts[i], self.out_ids[i], self.finish[i] or "length", len(r.prompt_ids))
            for i, r in enumerate(self.reqs)
        ]


class Generator:
    """A causal LM (+ named LoRA adapters) decoding batches of :class:`GenRequest`."""

    def __init__(
        self, model_path: str, adapters: dict[str, str] | None = None, dtype: str = "bfloat16"
    ) -> None:
        # The imports too hold the lock: transformers' lazy module is not thread-safe on first import, and two
        # engines loading at once (the default settings' frozen model and merged prompter) saw ImportError.
        with embedded.LOAD_LOCK:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model_path = model_path
        self.adapters = dict(adapters or {})
        with embedded.LOAD_LOCK:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
            model.eval()
            warn_if_mismatched(Path(model_path))  # a merged prompter carries its adapter's record
            if self.adapters:
                from peft import PeftModel

                first, *rest = self.adapters.items()
                model = PeftModel.from_pretrained(model, resolve_adapter(first[1]), adapter_name=first[0])
                for name, path in rest:
                    model.load_adapter(resolve_adapter(path), adapter_name=name)
                for path in self.adapters.values():
                    warn_if_mismatched(Path(resolve_adapter(path)))
                model.eval()
        self.model = model
        cfg = model.config
        self.context_length: int = int(getattr(cfg, "max_position_embeddings", 2048))
        self.vocab_size: int = int(model.get_input_embeddings().num_embeddings)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        if isinstance(eos, int):
            eos_ids.add(eos)
        elif isinstance(eos, list):
            eos_ids.update(eos)
        self.eos_ids = eos_ids
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = next(iter(eos_ids)) if eos_ids else 0
        # One batch at a time: the model is not re-entrant and the CPU has nothing to spare anyway.
        self.lock = threading.Lock()

    @property
    def device(self) -> Any:
        """Where the weights are: the CPU here; a GPU when a trainer's ``accelerate`` placed the model there."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------ tokenizing
    def chat_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_ids(self, ids: list[int]) -> None:
        """Refuse a prompt the model cannot embed: empty, or a token id outside the vocabulary. Checked before
        the row joins a batch, where it would fail every request decoded with it."""
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt", code="empty_prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})",
                param="prompt",
                code="invalid_token_id",
            )

    def check_length(self, n_prompt: int, max_new: int | None) -> int:
        """The number of new tokens to decode; raise ContextLengthError when it cannot fit."""
        room = self.context_length - n_prompt
        if max_new is None:
            max_new = min(DEFAULT_MAX_TOKENS, room)
        if n_prompt + max_new > self.context_length or room < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{n_prompt + max_new} tokens ({n_prompt} in the messages, {max_new} in the completion).",
                param="max_tokens",
            )
        return max_new

    # ------------------------------------------------------------------------------------ decoding
    @contextlib.contextmanager
    def _adapter(self, name: str | None) -> Iterator[None]:
        if not self.adapters:
            if name is not None:
                raise InvalidRequestError(f"no adapter named {name!r} is loaded", param="model")
            yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Decode ``requests`` together; they must share one adapter. Thread-safe (serialised)."""
        if not requests:
            return []
        adapters = {r.adapter for r in requests}
        if len(adapters) != 1:
            raise ValueError("a batch must use a single adapter")
        with self.lock, self.torch.inference_mode(), self._adapter(requests[0].adapter):
            return self._decode(list(requests))

    def _decode(self, reqs: list[GenRequest]) -> list[GenResult]:
        torch = self.torch
        ids, mask, pos = self._left_padded(reqs)
        sampling = self._sampling(reqs)
        rows = _Rows(reqs)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        max_steps = max(r.max_new_tokens for r in reqs)
        for step in range(max_steps):
            nxt = self._sample(out.logits[:, -1, :].float(), *sampling)
            for i in range(len(reqs)):
                if not self._take(rows, i, int(nxt[i])):
                    nxt[i] = self.pad_id  # a finished or cancelled row decodes padding
            if rows.all_finished() or step == max_steps - 1:
                break
            mask = torch.cat([mask, torch.ones((len(reqs), 1), dtype=torch.long, device=mask.device)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(
                input_ids=nxt.unsqueeze(1),
                attention_mask=mask,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return rows.results()

    def _left_padded(self, reqs: list[GenRequest]) -> tuple[Any, Any, Any]:
        """Input ids, attention mask and positions of the prompts; left padding keeps every row's last prompt
        token in the last column."""
        torch = self.torch
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            n = len(r.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.prompt_ids)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _sampling(self, reqs: list[GenRequest]) -> tuple[Any, Any, Any, list[Any]]:
        """The rows' temperatures, greedy flags, top-p values and seeded generators, as :meth:`_sample` takes them."""
        torch = self.torch
        temps = torch.tensor([max(r.temperature, 0.0) for r in reqs], device=self.device).unsqueeze(1)
        greedy = temps.squeeze(1) <= 1e-5
        top_ps = torch.tensor([r.top_p for r in reqs], device=self.device).unsqueeze(1)
        gens = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in reqs]
        return temps, greedy, top_ps, gens

    def _take(self, rows: _Rows, i: int, tok: int) -> bool:
        """Row ``i`` takes the sampled token ``tok``; False when the row had finished or is cancelled."""
        r = rows.reqs[i]
        if rows.finish[i] is not None:
            return False
        if r.cancelled.is_set():
            rows.finish[i] = "cancelled"
            return False
        if tok in self.eos_ids:
            rows.finish[i] = "stop"
        else:
            rows.out_ids[i].append(tok)
            text = str(self.tokenizer.decode(rows.out_ids[i], skip_special_tokens=True))
            cut = min((text.find(s) for s in r.stop if s in text), default=-1)
            rows.texts[i] = text[:cut] if cut >= 0 else text
            if cut >= 0:
                rows.finish[i] = "stop"
            elif len(rows.out_ids[i]) >= r.max_new_tokens:
                rows.finish[i] = "length"
        rows.emit(i)
        return True

    def _sample(self, logits: Any, temps: Any, greedy: Any, top_ps: Any, gens: list[Any]) -> Any:
        torch = self.torch
        choice = logits.argmax(-1)
        if bool(greedy.all()):
            return choice
        probs = torch.softmax(logits / temps.clamp(min=1e-5), dim=-1)
        # Nucleus filtering, vectorised: keep the smallest prefix of sorted tokens whose mass reaches top_p.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_ps
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        for i in range(logits.shape[0]):
            if bool(greedy[i]):
                continue
            # the seeded generators are CPU ones: a row on a GPU is drawn from on the CPU
            j = int(torch.multinomial(sorted_p[i].cpu(), 1, generator=gens[i]))
            choice[i] = order[i, j]
        return choice

    def sequence_logprobs(
        self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], adapter: str | None = None
    ) -> list[list[float]]:
        """Per-token log-probabilities of each completion given its prompt (for KL estimates)."""
        torch = self.torch
        results: list[list[float]] = []
        with self.lock, torch.inference_mode(), self._adapter(adapter):
            for p, c in zip(prompt_ids, completion_ids, strict=True):
                if not c:
                    results.append([])
                    continue
                ids = torch.tensor([list(p) + list(c)])
                logits = self.model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
                lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(c).unsqueeze(1)).squeeze(1)
                results.append(lp.tolist())
        return results


# ------------------------------------------------------------------------------------------- engine
@dataclass
class _Job:
    reqs: list[GenRequest]
    done: Callable[[list[GenResult] | BaseException], None]


class LocalEngine(Engine):
    kind = "local"

    def __init__(self, name: str, cfg: EngineConfig, generator: Generator | None = None) -> None:
        super().__init__(name)
        self.cfg = cfg
        self.extra_fields = frozenset(cfg.allowed_fields)  # it reads no extra field: each would go unheeded
        self.content_types = frozenset(cfg.content_types)
        self.generator = generator
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._served_name = {
            embedded.EMBEDDED: embedded.DEFAULT_MODEL.served_name,
            TRAINED: PROMPTER_ADAPTER,
        }.get(cfg.model, cfg.model)
        self._responses = ChatResponses(self.chat, self.chat_stream)
        self.batches = 0  # decoded batches and rows, to see batching at work (/ready, tests, benchmarks)
        self.rows = 0

    def default_model(self) -> str:
        return self._served_name

    async def fingerprint(self, model: str) -> str:
        """An adapter: the digest of its weights and config (a retrained adapter in the same folder is another one);
        the engine's own model when it is a merged prompter: the fingerprint of the adapter merged into it."""
        path = self.cfg.adapters.get(model)
        if path is not None:
            digest: str | None = await asyncio.to_thread(adapter_fingerprint, Path(resolve_adapter(path)))
        elif self.generator is not None:
            digest = await asyncio.to_thread(prompter_fingerprint, Path(self.generator.model_path))
        else:
            digest = None
        return f"{model}@sha256:{digest}" if digest else model

    async def start(self) -> None:
        if self.generator is None:
            path = await asyncio.to_thread(embedded.resolve, self.cfg.model)
            self.generator = await asyncio.to_thread(Generator, path, self.cfg.adapters, self.cfg.dtype)
        self._worker = threading.Thread(target=self._run, name=f"alignpro-gen-{self.name}", daemon=True)
        self._worker.start()

    async def aclose(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._worker.join, 30)
            self._worker = None

    async def ready(self) -> dict[str, Any]:
        if self.generator is None or self._worker is None or not self._worker.is_alive():
            raise UpstreamUnavailableError(f"engine {self.name!r} is not loaded")
        return {
            "kind": self.kind,
            "model": self._served_name,
            "queued": self._jobs.qsize(),
            "batches": self.batches,
            "rows": self.rows,
        }

    # The worker thread: gather jobs that arrive within batch_wait_ms and share an adapter, decode together.
    def _run(self) -> None:
        assert self.generator is not None
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self._jobs.get()
            if job is None:
                return
            batch = [job]
            rows = len(job.reqs)
            deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
            while rows < self.cfg.max_batch_size:
                try:
                    nxt = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                if (
                    nxt.reqs[0].adapter != job.reqs[0].adapter
                    or rows + len(nxt.reqs) > self.cfg.max_batch_size
                ):
                    pending.append(nxt)
                    break
                batch.append(nxt)
                rows += len(nxt.reqs)
            self._decode_batch(batch)

    def _decode_batch(self, batch: list[_Job]) -> None:
        """Decode the rows of ``batch`` (in slices of ``max_batch_size``: one job may hold more rows); when that
        fails, each job is decoded alone, so that one request's failure is its own and not its batch's."""
        flat = [r for j in batch for r in j.reqs]
        try:
            results = self._generate(flat)
        except BaseException as exc:
            log.exception("local generation failed (%d requests in the batch)", len(batch))
            for j in batch:
                # A row that streamed text already cannot start again: its request gets the error.
                if len(batch) == 1 or any(r.streamed for r in j.reqs):
                    j.done(exc)
                else:
                    self._decode_batch([j])
            return
        i = 0
        for j in batch:
            j.done(results[i : i + len(j.reqs)])
            i += len(j.reqs)

    def _generate(self, rows: list[GenRequest]) -> list[GenResult]:
        assert self.generator is not None
        size = self.cfg.max_batch_size
        results: list[GenResult] = []
        for s in range(0, len(rows), size):
            self.batches += 1
            self.rows += len(rows[s : s + size])
            results += self.generator.generate(rows[s : s + size])
        return results

    async def _submit(self, reqs: list[GenRequest]) -> list[GenResult]:
        if self._worker is None:
            raise UpstreamUnavailableError(f"engine {self.name!r} is not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[GenResult]] = loop.create_future()

        def done(res: list[GenResult] | BaseException) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

            loop.call_soon_threadsafe(settle)

        self._jobs.put(_Job(reqs, done))
        try:
            return await fut
        except asyncio.CancelledError:
            for r in reqs:  # the caller went away: stop decoding its rows at the next step
                r.cancelled.set()
            raise

    async def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Async batched generation (used by the prompter stage, eval and training)."""
        return await self._submit(reqs)

    # ------------------------------------------------------------------------------------ OpenAI shapes
    def _adapter_of(self, body: dict[str, Any]) -> str | None:
        model = body.get("model")
        if model in self.cfg.adapters:
            return str(model)
        return None

    def _requests(self, body: dict[str, Any], prompts: list[list[int]]) -> list[GenRequest]:
        assert self.generator is not None
        if body.get("logprobs"):
            raise InvalidRequestError("logprobs is not supported by the local engine", param="logprobs")
        n = int(body.get("n") or 1)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        seed = body.get("seed")
        adapter = self._adapter_of(body)
        max_new = body.get("max_completion_tokens") or body.get("max_tokens")
        reqs = []
        for ids in prompts:
            self.generator.check_ids(ids)
            limit = self.generator.check_length(len(ids), max_new)
            for k in range(n):
                reqs.append(
                    GenRequest(
                        prompt_ids=ids,
                        max_new_tokens=limit,
                        temperature=1.0 if temperature is None else float(temperature),
                        top_p=1.0 if top_p is None else float(top_p),
                        stop=stop,
                        seed=None if seed is None else int(seed) + k,
                        adapter=adapter,
                    )
                )
        return reqs

    def _chat_prompt(self, body: dict[str, Any]) -> list[list[int]]:
        assert self.generator is not None
        messages = [_plain_message(m) for m in body["messages"]]
        try:
            return [self.generator.chat_ids(messages)]
        except Exception as exc:  # e.g. a template that rejects the role order
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc

    async def responses(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._responses.create(body)

    def responses_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        return self._responses.stream(body)

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's ``/tokenize`` answer: the ids of ``prompt``, or of ``messages`` under the chat template."""
        assert self.generator is not None
        if isinstance(body.get("messages"), list):
            ids = self._chat_prompt(body)[0]
        elif isinstance(body.get("prompt"), str):
            ids = self.generator.text_ids(body["prompt"])
        else:
            raise InvalidRequestError("give prompt (a string) or messages", param="prompt")
        return {"count": len(ids), "max_model_len": self.generator.context_length, "tokens": ids}

    def _completion_prompts(self, body: dict[str, Any]) -> list[list[int]]:
        assert self.generator is not None
        prompt = body["prompt"]
        if isinstance(prompt, str):
            return [self.generator.text_ids(prompt)]
        if prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        return [self.generator.text_ids(p) if isinstance(p, str) else list(p) for p in prompt]

    @staticmethod
    def _usage(reqs: list[GenRequest], results: list[GenResult], n: int) -> dict[str, int]:
        prompt = sum(len(r.prompt_ids) for r in reqs[::n])
        completion = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._complete(body, self._chat_prompt(body), chat=True)

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._complete(body, self._completion_prompts(body), chat=False)

    async def _complete(self, body: dict[str, Any], prompts: list[list[int]], chat: bool) -> dict[str, Any]:
        """The OpenAI chat completion (``chat``) or text completion of ``prompts``."""
        reqs = self._requests(body, prompts)
        results = await self._submit(reqs)
        return {
            "id": new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or self._served_name,
            "choices": [
                {
                    "index": i,
                    **({"message": {"role": "assistant", "content": r.text}} if chat else {"text": r.text}),
                    "finish_reason": r.finish_reason,
                    "logprobs": None,
                }
                for i, r in enumerate(results)
            ],
            "usage": self._usage(reqs, results, int(body.get("n") or 1)),
        }

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        reqs = self._requests(body, self._chat_prompt(body))  # validation errors surface before streaming
        return self._stream(body, reqs, chat=True)

    def completion_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        reqs = self._requests(body, self._completion_prompts(body))
        return self._stream(body, reqs, chat=False)

    async def _stream(self, body: dict[str, Any], reqs: list[GenRequest], chat: bool) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

        def sink(i: int) -> Callable[[str], None]:
            def put(text: str) -> None:  # runs on the generation thread
                loop.call_soon_threadsafe(deltas.put_nowait, (i, text))

            return put

        for i, r in enumerate(reqs):
            r.on_text = sink(i)
        cid = new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        model = body.get("model") or self._served_name
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return sse_event(
                {"id": cid, "object": obj, "created": created, "model": model, "choices": choices, **extra}
            )

        def choice(i: int, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}

        task = asyncio.ensure_future(self._submit(reqs))
        try:
            if chat:
                yield chunk([choice(i, "", role=True) for i in range(len(reqs))])
            while not task.done() or not deltas.empty():
                get = asyncio.ensure_future(deltas.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    i, text = get.result()
                    yield chunk([choice(i, text)])
                else:
                    get.cancel()
            results = task.result()
            while not deltas.empty():  # pieces queued just before the task finished
                i, text = deltas.get_nowait()
                yield chunk([choice(i, text)])
            yield chunk([choice(i, None if chat else "", r.finish_reason) for i, r in enumerate(results)])
            opts = body.get("stream_options") or {}
            if opts.get("include_usage"):
                yield chunk([], usage=self._usage(reqs, results, int(body.get("n") or 1)))
            yield DONE_EVENT
        finally:
            if not task.done():
                for r in reqs:
                    r.cancelled.set()
                task.cancel()


def _plain_message(m: dict[str, Any]) -> dict[str, Any]:
    content = m.get("content")
    if isinstance(content, list):  # text parts only: the embedded models are text-only
        content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return {"role": m["role"], "content": content or ""}
