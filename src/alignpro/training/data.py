"""Prompt data for training and evaluating prompters: rows of ``id``, ``prompt`` (or ``messages``) and ``kind``.

A row is a single prompt (``prompt``), or a conversation (``messages``: OpenAI chat messages). A conversation's
last user message is the request the prompter rewrites; the messages before it are its history, which the
prompter sees as context (the gateway's rule, :func:`~alignpro.prompter.instruction.conversation_context`) and
the frozen model gets before the (rewritten) request; messages after the last user turn are ignored.

Sources (:func:`load_prompts`):

* a JSON Lines file (``.jsonl``/``.json``), one object a line;
* a CSV file with a header row;
* a folder: every ``.jsonl`` and ``.csv`` file in it (sorted by name, so the order is stable);
* a Hugging Face dataset name or a folder saved with ``save_to_disk``, read offline (``HF_DATASETS_OFFLINE``):
  only a local path or a dataset already in the cache; ``name:split`` picks a split (default ``train``).

``kind`` is ``"harmful"`` or ``"benign"`` (what the ``safe-and-helpful`` reward needs); a row without one gets
``default_kind``. A row without an ``id`` gets one from a hash of its prompt, so splits stay stable.

The train/dev split is a pure function of the id (:func:`split_of`): ``sha256(id) mod 100 < train_percent`` is
train. Adding rows never moves an existing row to the other side, and the dev side is never trained on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignpro.errors import ConfigError
from alignpro.prompter.instruction import conversation_context
from alignpro.settings import DEFAULT_CONTEXT_TURNS

Split = Literal["train", "dev", "all"]
KINDS = ("harmful", "benign")
DEFAULT_TRAIN_PERCENT = 80


@dataclass(frozen=True)
class Example:
    """A request to train or evaluate on. ``instruction_id_list`` and ``kwargs`` are IFBench-style verifiable
    output constraints (:mod:`alignpro.scoring.constraints`), empty for a request without any."""

    id: str
    prompt: str
    kind: str = "benign"
    instruction_id_list: tuple[str, ...] = ()
    # Arguments of each instruction, aligned with instruction_id_list; dicts do not hash, so not compared.
    kwargs: tuple[dict[str, Any] | None, ...] = field(default=(), compare=False)
    # A conversation's turns before ``prompt``, as (role, text); empty for a single prompt.
    history: tuple[tuple[str, str], ...] = ()

    @property
    def multi_turn(self) -> bool:
        return bool(self.history)

    def context(self, n: int = DEFAULT_CONTEXT_TURNS) -> list[tuple[str, str]]:
        """What the prompter sees before ``prompt``: the gateway's view of the history."""
        return conversation_context(self.history, n)

    def history_text(self) -> str:
        """The context as one text, for the validator's off-topic check (as the prompter stage does)."""
        return "\n".join(text for _, text in self.context())

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "kind": self.kind}
        if self.history:
            out["messages"] = [{"role": r, "content": t} for r, t in self.history] + [
                {"role": "user", "content": self.prompt}
            ]
        if self.instruction_id_list:
            out |= {"instruction_id_list": list(self.instruction_id_list), "kwargs": list(self.kwargs)}
        return out


def reward_columns(examples: Sequence[Example]) -> dict[str, list[Any]]:
    """The per-row dataset columns a reward gets besides the prompts (TRL's ``**kwargs``): ``kind`` always, the
    constraint columns when any row has constraints."""
    columns: dict[str, list[Any]] = {"kind": [e.kind for e in examples]}
    if any(e.instruction_id_list for e in examples):
        columns["instruction_id_list"] = [list(e.instruction_id_list) for e in examples]
        columns["kwargs"] = [list(e.kwargs) for e in examples]
    return columns


def _hash_pct(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100


def split_of(example_id: str, train_percent: int = DEFAULT_TRAIN_PERCENT) -> Literal["train", "dev"]:
    """Which side of the split an id falls on (deterministic, independent of the other rows)."""
    return "train" if _hash_pct(example_id) < train_percent else "dev"


def select_split(
    examples: Iterable[Example], split: Split, train_percent: int = DEFAULT_TRAIN_PERCENT
) -> list[Example]:
    if split == "all":
        return list(examples)
    if split not in ("train", "dev"):
        raise ConfigError(f"unknown split {split!r}; expected train, dev or all")
    return [e for e in examples if split_of(e.id, train_percent) == split]


def _conversation(messages: Any, where: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A ``messages`` column: (its last user message's text, the turns before it as (role, text))."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ConfigError(f"{where}: messages must be a list of chat messages (objects with a role)")
    turns = [(str(m["role"]), _text(m.get("content"))) for m in messages]
    users = [i for i, (role, text) in enumerate(turns) if role == "user" and text.strip()]
    if not users:
        raise ConfigError(f"{where}: a conversation has no user message with text")
    return turns[users[-1]][1], tuple(turns[: users[-1]])


def _text(content: Any) -> str:
    if isinstance(content, list):  # text parts
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return "" if content is None else str(content)


def _row(obj: dict[str, Any], default_kind: str, where: str) -> Example:
    history: tuple[tuple[str, str], ...] = ()
    if obj.get("messages") is not None:
        messages = obj["messages"]
        if isinstance(messages, str):  # a CSV cell holds JSON text
            try:
                messages = json.loads(messages)
            except ValueError as exc:
                raise ConfigError(f"{where}: messages is not JSON ({exc})") from exc
        last, history = _conversation(messages, where)
        return _example(obj, last, history, default_kind, where)
    prompt = obj.get("prompt")
    if prompt is None:
        for alt in ("text", "instruction", "question", "goal"):
            if obj.get(alt):
                prompt = obj[alt]
                break
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):  # chat rows: the last user turn
        prompt = prompt[-1].get("content")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: a row has no prompt")
    return _example(obj, prompt, (), default_kind, where)


def _example(
    obj: dict[str, Any], prompt: str, history: tuple[tuple[str, str], ...], default_kind: str, where: str
) -> Example:
    kind = str(obj.get("kind") or default_kind).strip().lower()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; expected harmful or benign")
    rid = obj.get("id")
    if rid is None or str(rid) == "":
        # a single prompt's id is a hash of its text (as before conversations existed); a conversation's, of all
        key = json.dumps([list(t) for t in history] + [prompt], ensure_ascii=False) if history else prompt
        rid = "h-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    ids, kwargs = _constraints(obj, where)
    return Example(str(rid), prompt, kind, ids, kwargs, history)


def _constraints(
    obj: dict[str, Any], where: str
) -> tuple[tuple[str, ...], tuple[dict[str, Any] | None, ...]]:
    """IFBench's ``instruction_id_list`` and ``kwargs`` columns (JSON text in a CSV cell, lists elsewhere)."""
    ids, kwargs = obj.get("instruction_id_list") or [], obj.get("kwargs") or []
    try:
        ids = json.loads(ids) if isinstance(ids, str) else ids
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs
    except ValueError as exc:
        raise ConfigError(f"{where}: instruction_id_list/kwargs are not JSON ({exc})") from exc
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ConfigError(f"{where}: instruction_id_list must be a list of instruction ids")
    if not isinstance(kwargs, list) or not all(k is None or isinstance(k, dict) for k in kwargs):
        raise ConfigError(f"{where}: kwargs must be a list of objects, one per instruction")
    return tuple(ids), tuple(kwargs)


def _read_jsonl(path: Path, default_kind: str) -> list[Example]:
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ConfigError(f"{path}:{i}: not JSON ({exc})") from exc
                out.append(_row(obj, default_kind, f"{path}:{i}"))
    return out


def _read_csv(path: Path, default_kind: str) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as f:
        return [_row(dict(r), default_kind, f"{path}:{i}") for i, r in enumerate(csv.DictReader(f), 2)]


def _saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _read_hf(name: str, default_kind: str) -> list[Example]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(
            "reading a Hugging Face dataset needs `datasets` (pip install alignpro[train])"
        ) from exc
    path = Path(name).expanduser()
    try:
        if path.is_dir() and _saved_dataset(path):
            ds: Any = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            base, _, split = name.partition(":")
            ds = datasets.load_dataset(base, split=split or "train")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"cannot load dataset {name!r} offline (only local paths and cached datasets are read): {exc}"
        ) from exc
    return [_row(dict(r), default_kind, f"{name}[{i}]") for i, r in enumerate(ds)]


def load_prompts(
    source: str | Path | Sequence[str | Path],
    *,
    split: Split = "all",
    train_percent: int = DEFAULT_TRAIN_PERCENT,
    limit: int | None = None,
    default_kind: str = "benign",
) -> list[Example]:
    """Rows from one or several sources (see the module docstring), the chosen side of the split, the first
    ``limit`` of them (after a stable shuffle by id hash, so a limit samples all sources alike)."""
    sources = [source] if isinstance(source, str | Path) else list(source)
    rows: list[Example] = []
    for src in sources:
        path = Path(src).expanduser()
        if path.is_dir() and not _saved_dataset(path):
            files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".csv"))
            if not files:
                raise ConfigError(f"{path} holds no .jsonl or .csv file")
            for p in files:
                rows += _read_csv(p, default_kind) if p.suffix == ".csv" else _read_jsonl(p, default_kind)
        elif path.is_file():
            rows += (
                _read_csv(path, default_kind) if path.suffix == ".csv" else _read_jsonl(path, default_kind)
            )
        else:
            rows += _read_hf(str(src), default_kind)
    seen: set[str] = set()
    for r in rows:
        if r.id in seen:
            raise ConfigError(f"duplicate id {r.id!r} in the prompt data")
        seen.add(r.id)
    rows = select_split(rows, split, train_percent)
    if limit is not None:
        # A stable pseudo-random subset: sort by a hash of the id (a different salt from the split's).
        rows = sorted(rows, key=lambda e: hashlib.sha256(("order:" + e.id).encode()).digest())[:limit]
    return rows


def balanced(examples: Sequence[Example], limit: int | None) -> list[Example]:
    """At most ``limit`` rows, half of each kind where possible (keeps the order within a kind)."""
    if limit is None or limit >= len(examples):
        return list(examples)
    by_kind = {k: [e for e in examples if e.kind == k] for k in KINDS}
    half = limit // 2
    take = {k: min(len(v), half) for k, v in by_kind.items()}
    spare = limit - sum(take.values())
    for k in KINDS:
        extra = min(spare, len(by_kind[k]) - take[k])
        take[k] += extra
        spare -= extra
    chosen = {e.id for k in KINDS for e in by_kind[k][: take[k]]}
    return [e for e in examples if e.id in chosen]


def data_hash(examples: Iterable[Example]) -> str:
    """sha256 over the rows (id, kind, prompt), in order: recorded with a trained adapter."""
    h = hashlib.sha256()
    for e in examples:
        row: list[Any] = [e.id, e.kind, e.prompt] + ([[list(t) for t in e.history]] if e.history else [])
        h.update(json.dumps(row, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
