"""The ``alignpro`` command line. Each command lives in its own module with a ``register(subparsers)``.

alignpro serve [--host H] [--port P] [--config FILE]   serve the aligned OpenAI-compatible API
alignpro models prepare [--force]                      convert the embedded model into safetensors
alignpro models merge-prompter [--adapter P] [--out D]  fold the LoRA prompter into a copy of its base model
alignpro rewrite "PROMPT" [--model ALIAS] [--url URL]  print the prompter's rewrite of PROMPT
alignpro chat ["PROMPT"] [--model ALIAS] [--url URL]   chat with a gateway (no PROMPT: one message per line)
alignpro train CONFIG.yaml [--resume]                  train an Align-Pro prompter (closed-form or RL)
alignpro eval --prompts FILE [--prompters none,trained]  the Align-Pro table: prompters vs the frozen model
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from alignpro import __version__
from alignpro.errors import AlignProError

# Modules that add sub-commands; imported lazily-light (their heavy imports happen inside the commands).
COMMAND_MODULES = [
    "alignpro.cli.serve",
    "alignpro.cli.train",
    "alignpro.cli.eval",
    "alignpro.cli.client",
]


def _missing(command: str, exc: ModuleNotFoundError) -> str:
    """What to say when ``alignpro COMMAND`` needs a module this install lacks (the base install has no numpy)."""
    return (
        f"'alignpro {command}' needs {exc.name or exc}, which is not installed: pip install 'alignpro[train]'"
    )


def _unavailable(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], module: str, exc: ModuleNotFoundError
) -> None:
    """The command of a module this install cannot import: it is listed, and running it says what is missing,
    instead of every command failing."""
    command = module.rsplit(".", 1)[1]
    why = _missing(command, exc)
    # No option prefix and no --help: whatever follows the command is taken, and answered with `why`.
    p = sub.add_parser(
        command, help=f"(unavailable: {exc.name} is not installed)", prefix_chars="\0", add_help=False
    )
    p.add_argument("args", nargs="*")

    def missing(args: argparse.Namespace) -> int:
        raise AlignProError(why)

    p.set_defaults(func=missing)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignpro",
        description="AlignPro: an alignment proxy for frozen LLMs. A prompter rewrites each prompt before a "
        "frozen model answers it (Align-Pro, arXiv 2501.03486).",
    )
    p.add_argument("--version", action="version", version=f"alignpro {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            _unavailable(sub, name, exc)
            continue
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AlignProError as exc:
        print(f"alignpro: {exc.message}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a command of an extra this install lacks, found when it runs
        print(f"alignpro: {_missing(args.command, exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
