"""AlignPro: an alignment proxy for frozen LLMs (Align-Pro, arXiv 2501.03486)."""

from __future__ import annotations

__version__ = "0.1.0"
