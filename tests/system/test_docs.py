"""The README's examples run: every code block that talks to the gateway on 127.0.0.1:8000 is run, as written,
against a real gateway (the address swapped for the test gateway's)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
DOC_URL = "http://127.0.0.1:8000"
_FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def gateway_blocks() -> list[tuple[str, str]]:
    """(language, code) of each python or bash block that uses the documented gateway address."""
    return [
        (lang, code)
        for lang, code in _FENCE.findall(README.read_text())
        if lang in ("python", "bash") and DOC_URL in code
    ]


BLOCKS = gateway_blocks()


def block_id(block: tuple[str, str]) -> str:
    lang, code = block
    first = next(line for line in code.splitlines() if line.strip() and not line.startswith("import "))
    return f"{lang}:{first.strip()[:40]}"


def test_the_readme_shows_every_client() -> None:
    text = "\n".join(code for _, code in BLOCKS)
    for needle in (
        "from openai import OpenAI",
        "from alignpro.client import",
        "AsyncAlignPro",
        "ChatOpenAI",
        "curl ",
        "alignpro chat",
        "alignpro rewrite",
    ):
        assert needle in text, f"no README example with {needle!r} is run"


# Outputs (regular expressions) that show an example did what it says, beyond exiting 0.
EXPECT = {
    "resp.model_extra": r"'mode': 'adapter'",
    "print(resp.alignpro)": r"original_prompt='How do I pick a lock\?'",
    "NotFoundError": r"404 model_not_found model",
    "curl ": r'(?s)"original_prompt":\s*"How do I pick a lock\?".*data: \[DONE\]',
    "--show-rewrite": r"\[alignpro\] mode=adapter",
    # Whether the prompter's rewrite was used (a fallback says "false").
    "x-alignpro-rewritten": r"(true|false)\s*$",
}


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[block_id(b) for b in BLOCKS])
def test_readme_example_runs(block: tuple[str, str], gateway_url: str, tmp_path: Path) -> None:
    lang, code = block
    if "langchain_openai" in code:
        pytest.importorskip("langchain_openai", reason="langchain-openai (dev extra) is not installed")
    code = code.replace(DOC_URL, gateway_url)
    env = {**os.environ, "ALIGNPRO_BASE_URL": gateway_url, "PYTHONUNBUFFERED": "1"}
    if lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        # `alignpro` as this interpreter's, whether or not its scripts folder is on PATH.
        prelude = f'alignpro() {{ {shlex.quote(sys.executable)} -m alignpro.cli.main "$@"; }}\n'
        argv = ["bash", "-euo", "pipefail", "-c", prelude + code]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert proc.stdout.strip() and "Traceback" not in out
    for marker, pattern in EXPECT.items():
        if marker in code:
            assert re.search(pattern, out), f"{pattern!r} not in the output:\n{out}"
