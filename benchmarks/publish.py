"""Where results files go: ``<stem>.{json,md}`` in ``benchmarks/results/`` unless the caller names its own
directory (experiments and device checks keep theirs beside their scripts); each written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.model_card import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(stem: str, data: Any, markdown: str, directory: Path = RESULTS) -> str:
    """Write ``stem.json`` (``data``) and ``stem.md`` (``markdown``) into ``directory``; return the markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / f"{stem}.json", data)
    write_text_atomic(directory / f"{stem}.md", markdown)
    return markdown
