"""``/v1/responses`` on the default gateway (the embedded engine, as `make serve` runs it): the prompter on the
user input, the ``alignpro`` extension, streaming events, and ``previous_response_id``."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_responses_create_and_continue(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="smollm2-aligned",
        input="Name three colours of the rainbow.",
        max_output_tokens=16,
        temperature=0,
    )
    assert first.status in ("completed", "incomplete") and first.output_text.strip()
    info = first.model_extra["alignpro"]  # type: ignore[index]
    assert info["mode"] == "adapter" and info["original_prompt"] == "Name three colours of the rainbow."
    assert first.usage is not None and first.usage.output_tokens > 0
    follow = client.responses.create(
        model="smollm2", input="Name two more.", previous_response_id=first.id, max_output_tokens=8
    )
    assert follow.previous_response_id == first.id and follow.output_text.strip()
    # The stored conversation reached the model: its prompt holds the first turn and answer too.
    assert follow.usage is not None and follow.usage.input_tokens > first.usage.input_tokens
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(
            model="smollm2", input="Hi", previous_response_id="resp_nope", max_output_tokens=4
        )
    assert err.value.code == "previous_response_not_found"


def test_responses_stream(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model="smollm2-aligned", input="Say hello.", max_output_tokens=12, stream=True
        )
    )
    assert events[0].type == "response.created"
    assert events[0].model_extra["alignpro"]["original_prompt"] == "Say hello."  # type: ignore[index]
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == last.response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
