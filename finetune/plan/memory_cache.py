"""The memory plan's disk cache: one JSON reading per configuration and micro-batch, keyed by everything that
decides it, the simulating code included (FINETUNE_MEMORY_CACHE, default ~/.cache/finetune/memory). A broken
entry is named once and recomputed; a cache that cannot be written is noted once and planned without."""
import ast
import contextlib
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from finetune.plan.memory_process import SimulationChild
from finetune.plan.memory_step import exceeds

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where the simulation starts; every file of ours these import, at the top or inside a function, decides a reading
# too, so a change to any of them must not reuse old figures.
SIMULATION_ENTRY = ("finetune.plan.memory", "finetune.plan.memory_step")


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (REPO_ROOT.joinpath(*parts).with_suffix(".py"), REPO_ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def simulating_files() -> tuple[Path, ...]:
    """The repository files the simulated step runs: the entry modules and, transitively, every module of this
    repository they import (finetune.* and the top-level model files such as modeling_baichuan.py)."""
    seen: dict[str, Path] = {}
    todo = list(SIMULATION_ENTRY)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo.append(node.module)
                todo += [f"{node.module}.{alias.name}" for alias in node.names]  # `from pkg import module`
    return tuple(sorted(seen.values()))

def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_MEMORY_CACHE") or Path.home() / ".cache" / "finetune" / "memory")


def _cache_key(config, setup, micro, passes):
    import transformers

    sources = b"".join(path.read_bytes() for path in simulating_files())
    text = json.dumps([config, setup, micro, passes, torch.__version__, transformers.__version__,
                       hashlib.sha256(sources).hexdigest()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def readings(config: dict, setup: dict, runs: list[tuple[int, int]], stop: dict | None,
             child: SimulationChild) -> dict[int, dict]:
    """{micro: reading} for `runs` [(micro-batch size, micro-batches per step)] of one setup, smallest first,
    from the cache or simulated by `child`; with a stop rule, up to the first size that fits in none of the
    offload settings it names."""
    runs, readings = sorted(runs), {}
    folder = cache_dir()

    def entry(micro):
        return folder / f"{_cache_key(config, setup, micro, dict(runs)[micro])}.json"

    for index, (micro, _) in enumerate(runs):
        cached = _cached_reading(entry(micro))
        if cached is None:
            fresh = child.simulate(config, {"setup": setup, "runs": runs[index:], "stop": stop})
            for fresh_micro, reading in fresh.items():
                _store_reading(entry(fresh_micro), reading)
            return {**readings, **fresh}
        readings[micro] = cached
        if exceeds(readings[micro], stop):
            break
    return readings


# Cache folders this process found unusable: noted once each, then planned without.
_UNUSABLE_CACHES = set()


def _cached_reading(path):
    """The reading cached at `path`; None when there is none, or when it is broken (one warning naming it: the
    caller recomputes it, and the fresh reading replaces it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # not cached yet, or the cache location is no folder
        return None
    except (OSError, ValueError) as exc:  # a folder in its place, unreadable bytes, an I/O error
        problem = getattr(exc, "strerror", None) or str(exc)
    else:
        try:
            reading = json.loads(text)
        except ValueError:
            problem = "not valid JSON; truncated?"
        else:
            problem = _reading_problem(reading)
            if problem is None:
                return reading
    print(f"warning: memory-plan cache entry {path} is broken ({problem}); recomputing it", file=sys.stderr,
          flush=True)
    return None


def _reading_problem(reading):
    """Why a cached reading cannot be believed (a peak must be a byte count: a whole number, not negative), or
    None."""
    if not isinstance(reading, dict):
        return f"a JSON {type(reading).__name__}, not a reading"
    for part in ("on_device", "offloaded"):
        figures = reading.get(part)
        if not isinstance(figures, dict):
            return f"no {part} figures"
        for key in ("device_peak", "host_peak"):
            if not _is_byte_count(figures.get(key)):
                return f"{part} {key} is {figures.get(key)!r}"
        categories = figures.get("categories")
        if not isinstance(categories, dict) or not all(map(_is_byte_count, categories.values())):
            return f"{part} categories are not byte counts"
    return None


def _is_byte_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _store_reading(path, reading):
    """Cache a fresh reading. Where the cache cannot be written (a file in its place, a read-only disk, no
    permission), say so once and plan without it: the figures are the same, only slower next time."""
    folder = path.parent
    if folder in _UNUSABLE_CACHES or path.is_dir():  # a folder in the entry's place was already reported
        return
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(reading), encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        _UNUSABLE_CACHES.add(folder)
        reason = "a file is in its place" if folder.is_file() else exc.strerror or exc
        print(f"note: cannot write the memory-plan cache {folder} ({reason}); planning without it "
              f"(set FINETUNE_MEMORY_CACHE to a writable folder)", file=sys.stderr, flush=True)
