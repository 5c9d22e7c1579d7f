"""Conversations and agents through real gateway processes in front of a scripted upstream (the shape is the point):
a tool loop across two replicas, a follow-up turn, structured output, LangChain's bind_tools, pass-through routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2  # the HTTP library of the openai client
import openai
import pytest

from alignpro.testing.scripted import JSON_ANSWER, ScriptedUpstream, tool_arguments
from alignpro.testing.servers import free_port, start_gateway

WEATHER_TOOL: Any = {  # Any: the openai client types its parameters as TypedDicts
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QUESTION = "What's the weather in Paris today, and should I take an umbrella?"


def _config(url: str) -> str:
    return f"""
engines:
  up: {{kind: openai, urls: ["{url}"], model: frozen}}
aliases:
  agent: {{engine: up, prompter: {{mode: reference, engine: up, fail_policy: closed, allow_client_system: true}}}}
  agent-off: {{engine: up, prompter: {{mode: reference, engine: up, conversation: {{agents: "off"}}}}}}
"""


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream(free_port()).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def replicas(scripted: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two gateway replicas with their own rewrite caches, in front of the one scripted upstream."""
    tmp = tmp_path_factory.mktemp("conversations")
    servers = [start_gateway(tmp, _config(scripted.url)) for _ in range(2)]
    yield [url for _, url in servers]
    for server, _ in servers:
        server.stop()


class _Sent:
    """What an openai client put on the wire: the JSON bodies of its requests, in key order."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> None:
        self.bodies.append(json.loads(request.read()))


def _client(url: str, sent: _Sent) -> openai.OpenAI:
    http = httpx2.Client(event_hooks={"request": [sent]})
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=http)


def _dumped(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False)  # key order kept: equal strings, equal bytes on the wire


def test_tool_loop_keeps_one_rewrite_and_the_agent_structure(
    scripted: ScriptedUpstream, replicas: list[str]
) -> None:
    """user -> tool call -> tool result -> tool call -> tool result -> answer, each step on the other replica."""
    sent = _Sent()
    clients = [_client(url, sent) for url in replicas]
    messages: list[Any] = [
        {"role": "system", "content": "You are a weather assistant. Use the tools."},
        {"role": "user", "content": QUESTION},
    ]
    before = len(scripted.bodies("model"))
    infos = []
    for step in range(3):
        resp = clients[step % 2].chat.completions.create(
            model="agent",
            messages=messages,
            tools=[WEATHER_TOOL],
            tool_choice="auto",
            max_tokens=32,
        )
        infos.append(resp.model_extra["alignpro"])  # type: ignore[index]
        msg = resp.choices[0].message
        if step < 2:
            assert resp.choices[0].finish_reason == "tool_calls"
            assert msg.tool_calls is not None
            call = msg.tool_calls[0]
            assert call.type == "function"
            assert (call.id, call.function.name, call.function.arguments) == (
                f"call_{step + 1}",
                "get_weather",
                tool_arguments(step + 1),
            )
            messages.append({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 14, "rain": "80%"}'}
            )
        else:
            assert msg.content == f"After 2 tool results: {infos[0]['rewritten_prompt']}"

    received = scripted.bodies("model")[before:]
    assert len(received) == 3
    # The frozen model sees the same question at every step, though each replica drew it on its own.
    sent_user = [b["messages"][1]["content"] for b in received]
    assert sent_user[0] != QUESTION and sent_user == [sent_user[0]] * 3
    assert [i["rewritten_prompt"] for i in infos] == sent_user
    assert infos[1]["cached"] is False  # replica B drew it itself, with the seed of this history
    # Tool calls, tool results, the system prompt and the tool definitions reach the model as the agent sent them.
    for client_body, upstream_body in zip(sent.bodies, received, strict=True):
        assert [_dumped(m) for m in upstream_body["messages"][2:]] == [
            _dumped(m) for m in client_body["messages"][2:]
        ]
        assert _dumped(upstream_body["messages"][0]) == _dumped(client_body["messages"][0])
        assert upstream_body["tools"] == client_body["tools"] and upstream_body["tool_choice"] == "auto"
    assert [i["agent"]["signals"] for i in infos] == [["tools", "tool_choice"]] + [
        ["tools", "tool_choice", "tool_result"]
    ] * 2
    assert {i["agent"]["prompter"] for i in infos} == {"user_turns"}


def test_streamed_tool_calls_are_relayed_intact(scripted: ScriptedUpstream, replicas: list[str]) -> None:
    chat: Any = [{"role": "user", "content": QUESTION}]
    body = {
        "model": "agent",
        "messages": chat,
        "tools": [WEATHER_TOOL],
        "stream": True,
    }
    with httpx.stream("POST", f"{replicas[0]}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        events = [e + b"\n\n" for e in resp.read().split(b"\n\n") if e]
    upstream = scripted.sent_events
    assert events[1:] == upstream[1:]  # every event after the first (which gains `alignpro`) byte-for-byte
    first = json.loads(events[0][len(b"data: ") :])
    assert first["alignpro"]["agent"]["signals"] == ["tools"]
    assert first["choices"] == json.loads(upstream[0][len(b"data: ") :])["choices"]
    sent = openai.OpenAI(base_url=f"{replicas[1]}/v1", api_key="unused").chat.completions.create(
        model="agent",
        messages=chat,
        tools=[WEATHER_TOOL],
        stream=True,
    )
    args = "".join(
        call.function.arguments or ""
        for c in sent
        for call in (c.choices[0].delta.tool_calls or [] if c.choices else [])
        if call.function is not None
    )
    assert args == tool_arguments(1)


def test_follow_up_turn_is_rewritten_with_its_conversation(
    scripted: ScriptedUpstream, replicas: list[str]
) -> None:
    first = "Name the planets of the solar system in order from the sun."
    chat = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune."},
        {"role": "user", "content": "and the second one?"},
    ]
    n_prompter = len(scripted.bodies("prompter"))
    resp = httpx.post(
        f"{replicas[0]}/v1/chat/completions", json={"model": "agent", "messages": chat}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    info = resp.json()["alignpro"]
    # The prompter saw the first turn (and the answer) as data before the follow-up.
    seen = [b["messages"][-1]["content"] for b in scripted.bodies("prompter")[n_prompter:]]
    follow = next(s for s in seen if "and the second one?" in s)
    assert f"<conversation>\nuser: {first}\nassistant: Mercury" in follow
    # The follow-up's rewrite keeps its reference to the first turn and is what the model got.
    assert info["rewritten_prompt"] == f"and the second one? (following up on: {first})"
    upstream = scripted.bodies("model")[-1]["messages"]
    assert upstream[2]["content"] == info["rewritten_prompt"]
    assert upstream[1] == chat[1]
    assert (info["turn"], info["context_turns"]) == (2, 2)
    assert [t["index"] for t in info["turns"]] == [0, 2] and info["turns"][0]["rewritten"] is True


def test_json_output_and_agents_off(scripted: ScriptedUpstream, replicas: list[str]) -> None:
    client = openai.OpenAI(base_url=f"{replicas[0]}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="agent",
        messages=[{"role": "user", "content": "Give me the answer as JSON."}],
        response_format={"type": "json_object"},
    )
    assert resp.choices[0].message.content == JSON_ANSWER
    assert resp.model_extra["alignpro"]["agent"] == {"signals": ["response_format"], "prompter": "user_turns"}  # type: ignore[index]
    assert scripted.bodies("model")[-1]["response_format"] == {"type": "json_object"}
    resp = client.chat.completions.create(
        model="agent-off",
        messages=[{"role": "user", "content": QUESTION}],
        tools=[WEATHER_TOOL],
    )
    info = resp.model_extra["alignpro"]  # type: ignore[index]
    assert info["agent"] == {"signals": ["tools"], "prompter": "off"} and info["rewritten"] is False
    assert scripted.bodies("model")[-1]["messages"] == [{"role": "user", "content": QUESTION}]


def test_langchain_bind_tools(scripted: ScriptedUpstream, replicas: list[str]) -> None:
    """A LangChain tool-calling loop, its steps spread over both replicas as a load balancer would."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return json.dumps({"city": city, "temp_c": 14})

    question = "Is it going to rain in Paris this afternoon?"
    bound = [
        ChatOpenAI(
            base_url=f"{url}/v1",
            api_key="unused",
            model="agent",
            max_retries=0,
            include_response_headers=True,
        ).bind_tools([get_weather])
        for url in replicas
    ]
    before = len(scripted.bodies("model"))
    history: list[Any] = [HumanMessage(question)]
    for step in (1, 2):
        ai = bound[step % 2].invoke(history)
        assert ai.response_metadata["headers"]["x-alignpro-rewritten"] == "true"
        assert [(c["name"], c["args"], c["id"]) for c in ai.tool_calls] == [
            ("get_weather", json.loads(tool_arguments(step)), f"call_{step}")
        ]
        history += [
            ai,
            ToolMessage(get_weather.invoke(ai.tool_calls[0]["args"]), tool_call_id=ai.tool_calls[0]["id"]),
        ]
    final = bound[1].invoke(history)
    assert str(final.content).startswith("After 2 tool results: ")
    received = scripted.bodies("model")[before:]
    upstream = received[-1]
    assert [m["role"] for m in upstream["messages"]] == ["user", "assistant", "tool", "assistant", "tool"]
    assert upstream["messages"][1]["tool_calls"][0]["function"]["arguments"] == tool_arguments(1)
    assert upstream["tools"][0]["function"]["name"] == "get_weather"
    # Every step, whichever replica served it, put the same rewrite of the question before the model.
    asked = {b["messages"][0]["content"] for b in received}
    assert len(asked) == 1 and question in asked.pop()


def test_embeddings_and_tokenize_pass_through(scripted: ScriptedUpstream, replicas: list[str]) -> None:
    client = openai.OpenAI(base_url=f"{replicas[0]}/v1", api_key="unused", max_retries=0)
    emb = client.embeddings.create(model="agent", input=["abc", "hello"])
    assert [d.embedding for d in emb.data] == [[3.0, 1.0], [5.0, 1.0]]
    assert json.loads(scripted.requests[-1][1])["model"] == "frozen"
    tok = httpx.post(
        f"{replicas[0]}/tokenize", json={"model": "agent", "prompt": "one two three"}, timeout=30
    )
    assert tok.status_code == 200 and tok.json()["count"] == 3
    assert scripted.requests[-1][0] == "/tokenize"


def test_responses_rewrites_user_input_and_relays_the_rest(
    scripted: ScriptedUpstream, replicas: list[str]
) -> None:
    call = {
        "type": "function_call",
        "call_id": "call_9",
        "name": "get_weather",
        "arguments": tool_arguments(1),
    }
    items: Any = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        call,
        {"type": "function_call_output", "call_id": "call_9", "output": '{"temp_c": 14}'},
    ]
    tool: Any = {"type": "function", "name": "get_weather", "parameters": {}}
    client = openai.OpenAI(base_url=f"{replicas[0]}/v1", api_key="unused", max_retries=0)
    resp = client.responses.create(
        model="agent",
        input=items,
        previous_response_id="resp_earlier",
        tools=[tool],
    )
    assert resp.output_text == "3 input items"
    info = resp.model_extra["alignpro"]  # type: ignore[index]
    assert info["agent"]["signals"] == ["tools", "tool_result"] and info["original_prompt"] == QUESTION
    sent = json.loads(scripted.requests[-1][1])
    assert sent["previous_response_id"] == "resp_earlier" and sent["model"] == "frozen"
    assert sent["input"][0]["content"] == [{"type": "input_text", "text": info["rewritten_prompt"]}]
    assert info["rewritten_prompt"] != QUESTION
    assert [_dumped(i) for i in sent["input"][1:]] == [_dumped(i) for i in items[1:]]
