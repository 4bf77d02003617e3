"""Shared by the benchmark scripts: each owns one marked section of ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import re
from pathlib import Path

from qeq_unroll.params import write_atomic

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(key: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between ``<!-- key:start -->`` and ``<!-- key:end -->``,
    keeping every other section; the file is written atomically."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    body = f"{start}\n{text}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: body, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body + "\n"
    write_atomic(path, new)
