"""The command line's persistent compilation cache: a second process loads what the first one
compiled (the cache folder gains no entry), and ``--no-compilation-cache`` writes none."""

import os
import subprocess
import sys
from pathlib import Path

COMMAND = ["demo", "--no-fit", "--steps", "3"]  # two small relaxations: a few compilations


def run(*args, env=None):
    done = subprocess.run([sys.executable, "-m", "calculators.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def entries(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def test_second_process_reuses_the_cache_and_it_can_be_turned_off(tmp_path):
    cache = tmp_path / "cache"
    run("--compilation-cache", str(cache), *COMMAND)
    first = entries(cache)
    assert first, "the first run wrote no compiled function"
    run("--compilation-cache", str(cache), *COMMAND)
    assert entries(cache) == first, "the second run compiled again instead of loading"
    other = tmp_path / "env-cache"
    run("--no-compilation-cache", *COMMAND, env={"QEQ_UNROLL_CACHE_DIR": str(other)})
    assert not entries(other)
    run(*COMMAND, env={"QEQ_UNROLL_CACHE_DIR": str(other)})
    assert entries(other)
