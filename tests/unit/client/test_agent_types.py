"""The client's types carry what agents send and get back: tools, tool calls (whole and streamed), JSON formats."""

from __future__ import annotations

from alignpro.client._base import request_body
from alignpro.protocol import ChatCompletion, ChatCompletionChunk, ResponseFormat, Tool

CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def test_a_tool_call_answer_is_typed_and_goes_back_as_received() -> None:
    resp = ChatCompletion.model_validate(
        {
            "id": "c",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, "tool_calls": [CALL]},
                    "finish_reason": "tool_calls",
                }
            ],
        }
    )
    msg = resp.choices[0].message
    assert msg.tool_calls is not None and msg.tool_calls[0].function is not None
    assert msg.tool_calls[0].function.arguments == '{"city": "Paris"}'
    tool = Tool(function={"name": "get_weather", "parameters": {"type": "object"}})
    body = request_body(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}, msg]},
        {"tools": [tool], "tool_choice": "auto", "response_format": ResponseFormat(type="json_object")},
    )
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    assert (body["tool_choice"], body["response_format"]) == ("auto", {"type": "json_object"})


def test_streamed_tool_call_pieces_are_typed() -> None:
    chunk = ChatCompletionChunk.model_validate(
        {
            "id": "c",
            "created": 0,
            "model": "m",
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}}
            ],
        }
    )
    calls = chunk.choices[0].delta.tool_calls
    assert calls is not None and calls[0].index == 0 and calls[0].function is not None
    assert calls[0].function.arguments == '{"ci'
