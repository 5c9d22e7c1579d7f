"""``alignpro chat``, and the gateway side of ``alignpro rewrite --url``: the gateway's API from a shell.

alignpro chat "PROMPT" [--model ALIAS] [--url URL] [--no-stream] [--show-rewrite]   one question, one answer
alignpro chat [--model ALIAS] ...                     a conversation: one message per line of standard input

The answer goes to standard output; what the prompter did (``--show-rewrite``) and errors go to standard error,
so the answer can be piped. ``--url`` defaults to ``ALIGNPRO_BASE_URL`` (then ``http://127.0.0.1:8000/v1``), the
key to ``ALIGNPRO_API_KEY``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client (httpx, pydantic) is imported when a command runs, not when the CLI starts
    from alignpro.client import AlignPro, AlignProInfo
    from alignpro.protocol import AlignProOptions, RewriteResponse


def connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", help="the gateway's base URL (default ALIGNPRO_BASE_URL, else http://127.0.0.1:8000/v1)"
    )
    p.add_argument("--api-key", help="API key (default ALIGNPRO_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")


def remote_url(args: argparse.Namespace) -> str | None:
    """The gateway to talk to, when one was named (``--url`` or ``ALIGNPRO_BASE_URL``)."""
    return getattr(args, "url", None) or os.environ.get("ALIGNPRO_BASE_URL") or None


def make_client(args: argparse.Namespace) -> AlignPro:
    from alignpro.client import AlignPro

    return AlignPro(base_url=args.url, api_key=args.api_key, timeout=args.timeout)


def remote_rewrite(args: argparse.Namespace, options: AlignProOptions | None) -> RewriteResponse:
    """``alignpro rewrite --url``: the rewrite as the gateway at ``--url`` makes it."""
    from alignpro.client import APIError
    from alignpro.errors import AlignProError

    with make_client(args) as client:
        try:
            return client.rewrite(model=args.model, prompt=args.prompt, alignpro=options)
        except APIError as exc:
            # Printed as `alignpro: ...` with exit status 2 by cli.main, like an in-process failure.
            raise AlignProError(str(exc)) from exc


def describe(info: AlignProInfo | None) -> str:
    """One line on what the prompter did, for ``--show-rewrite``."""
    if info is None:
        return "[alignpro] (the server sent no alignpro object)"
    head = f"[alignpro] mode={info.mode}"
    if info.rewritten and info.guidance:
        return f"{head} guidance: {info.guidance}"
    if info.rewritten:
        return f"{head} rewritten: {info.rewritten_prompt}"
    return f"{head} original prompt kept" + (f" ({info.fallback})" if info.fallback else "")


def _turn(client: AlignPro, args: argparse.Namespace, messages: list[dict[str, Any]]) -> str:
    """Send the conversation, print the answer as it comes, and return it."""
    params: dict[str, Any] = {}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if not args.stream:
        resp = client.chat.completions.create(model=args.model, messages=messages, **params)
        if args.show_rewrite:
            print(describe(resp.alignpro), file=sys.stderr, flush=True)
        text = resp.choices[0].message.text() if resp.choices else ""
        print(text, flush=True)
        return text
    pieces: list[str] = []
    with client.chat.completions.create(model=args.model, messages=messages, stream=True, **params) as stream:
        for i, chunk in enumerate(stream):
            if i == 0 and args.show_rewrite:
                print(describe(stream.alignpro), file=sys.stderr, flush=True)
            for choice in chunk.choices:
                if choice.index == 0 and choice.delta.content:
                    pieces.append(choice.delta.content)
                    print(choice.delta.content, end="", flush=True)
    print(flush=True)
    return "".join(pieces)


def cmd_chat(args: argparse.Namespace) -> int:
    from alignpro.client import APIError

    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    with make_client(args) as client:
        if args.prompt is not None:
            try:
                _turn(client, args, [*history, {"role": "user", "content": args.prompt}])
            except APIError as exc:
                print(f"alignpro: {exc}", file=sys.stderr)
                return 2
            return 0
        interactive = sys.stdin.isatty()
        failed = False
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            if not line.strip():
                continue
            turn = [*history, {"role": "user", "content": line}]
            try:
                answer = _turn(client, args, turn)
            except APIError as exc:
                # The conversation goes on without the failed turn.
                print(f"alignpro: {exc}", file=sys.stderr)
                failed = True
                continue
            history = [*turn, {"role": "assistant", "content": answer}]
        if interactive:
            print(file=sys.stderr)
    return 2 if failed and not interactive else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser(
        "chat",
        help="chat with a model alias of a running gateway",
        description="Send PROMPT to a gateway and print the answer; without PROMPT, hold a conversation: each "
        "line of standard input is a user message (the history is sent along), until end of input.",
    )
    c.add_argument("prompt", nargs="?", help="a one-shot prompt (default: read messages from standard input)")
    c.add_argument("--model", default="smollm2-aligned", help="model alias (default smollm2-aligned)")
    c.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print the answer as it is generated",
    )
    c.add_argument(
        "--show-rewrite", action="store_true", help="print what the prompter did, to standard error"
    )
    c.add_argument("--system", help="a system message to start the conversation with")
    c.add_argument("--max-tokens", type=int, help="longest answer, in tokens")
    c.add_argument("--temperature", type=float, help="sampling temperature")
    connection_args(c)
    c.set_defaults(func=cmd_chat)
