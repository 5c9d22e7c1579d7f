"""Request bodies the gateway refuses before anything walks them (issue 16, items 5 and 13)."""

from __future__ import annotations

import pytest

from alignpro.errors import InvalidRequestError
from alignpro.server.errors import MAX_JSON_DEPTH, parse_json


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 1000 + b"]" * 1000,
        b'{"a": ' * 5000 + b"1" + b"}" * 5000,
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
    ],
)
def test_5_deep_nesting_is_refused(body: bytes) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_json(body)
    assert err.value.code == "invalid_json" and "nests" in err.value.message


@pytest.mark.parametrize("body", [b'{"p": "\\ud800"}', b'["ok", {"\\udc00": 1}]', b'"\\udfffx"'])
def test_13_lone_surrogates_are_refused(body: bytes) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_json(body)
    assert err.value.code == "invalid_unicode"


def test_valid_bodies_pass() -> None:
    assert parse_json(b'{"a": [1, {"b": "\\ud83d\\ude00"}], "c": null}') == {
        "a": [1, {"b": "\U0001f600"}],
        "c": None,
    }
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(nested) is not None
    assert parse_json(b"null") is None
