"""Conversation rows (a ``messages`` field) in the prompt data: the request, its history, the prompter's view, and
what the frozen model is served when R is estimated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignpro.errors import ConfigError
from alignpro.scoring.estimate import served_messages
from alignpro.training.data import data_hash, load_prompts

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name the planets in order."},
    {"role": "assistant", "content": [{"type": "text", "text": "Mercury, Venus, Earth..."}]},
    {"role": "user", "content": "and the second one?"},
    {"role": "assistant", "content": "Venus."},  # a reference answer after the request: ignored
]


def test_conversation_rows_load_beside_single_prompts(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"id": "one", "prompt": "Say hi.", "kind": "benign"}, {"messages": CHAT, "kind": "benign"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    single, conv = sorted(load_prompts(path), key=lambda e: e.multi_turn)  # loaded in hash order
    assert (single.prompt, single.history, single.multi_turn) == ("Say hi.", (), False)
    assert conv.prompt == "and the second one?" and conv.multi_turn
    assert conv.history == (
        ("system", "Be brief."),
        ("user", "Name the planets in order."),
        ("assistant", "Mercury, Venus, Earth..."),
    )
    # The prompter sees user and assistant turns only, as the gateway shows them.
    assert conv.context() == [
        ("user", "Name the planets in order."),
        ("assistant", "Mercury, Venus, Earth..."),
    ]
    assert conv.context(1) == [("assistant", "Mercury, Venus, Earth...")]
    assert conv.id.startswith("h-")
    assert conv.as_dict()["messages"][-1] == {"role": "user", "content": "and the second one?"}
    # A single prompt hashes as before conversations existed; the history is part of a conversation's hash.
    assert data_hash([single]) != data_hash([conv])


def test_a_conversation_is_served_after_its_history() -> None:
    history = [("user", "Name the planets."), ("assistant", "Mercury, Venus...")]
    assert served_messages("and the second?", "What is the second planet?", "rewrite", history)[-1] == {
        "role": "user",
        "content": "What is the second planet?",
    }
    augmented = served_messages("and the second?", "Answer briefly.", "augment", history)
    assert augmented[0] == {"role": "system", "content": "Answer briefly."} and len(augmented) == 4
    assert served_messages("x", None, "rewrite") == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "hi"}],
        [{"content": "no role"}],
        "not json",
    ],
)
def test_bad_conversations_are_config_errors(tmp_path: Path, messages: object) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1"):
        load_prompts(path)


def test_csv_cells_hold_conversations_as_json(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    cell = json.dumps(CHAT[:4]).replace('"', '""')
    path.write_text(f'id,kind,messages\nc1,benign,"{cell}"\n')
    (row,) = load_prompts(path)
    assert row.prompt == "and the second one?" and len(row.history) == 3
