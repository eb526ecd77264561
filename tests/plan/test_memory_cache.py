"""finetune/plan/memory_cache.py: a broken cache entry is named once and recomputed; an unusable cache location
plans without caching, with one note."""
import contextlib
import subprocess

import pytest
from conftest import RecordingChild

from finetune.plan import memory, memory_cache, memory_process


# ---- the memory-plan cache (FINETUNE_MEMORY_CACHE) ----------------------------------------------------------

TINY_CONFIG = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4}


def plan_with(cache, monkeypatch, capsys):
    """A small plan through a recording stand-in for the simulation child: (plan, sizes simulated, stderr)."""
    monkeypatch.setenv("FINETUNE_MEMORY_CACHE", str(cache))
    monkeypatch.setattr(memory_cache, "_UNUSABLE_CACHES", set())
    child = RecordingChild()
    monkeypatch.setattr(memory_process, "SimulationChild", lambda: contextlib.nullcontext(child))
    plan = memory.plan_candidates(TINY_CONFIG, 1, 8, 128, device_memory_gb=80, checkpointing=False,
                                  cpu_offload=False)
    return plan, child.asked, capsys.readouterr().err


@pytest.mark.parametrize("damage, problem", [
    (lambda entry: entry.write_text("{}"), "no on_device figures"),
    (lambda entry: entry.write_text("[1, 2]"), "a JSON list"),
    (lambda entry: entry.write_text(entry.read_text()[:20]), "not valid JSON"),
    (lambda entry: entry.write_text(entry.read_text().replace('"device_peak": 1', '"device_peak": -9e290')),
     "device_peak is -9e+290"),
    (lambda entry: entry.write_text(entry.read_text().replace('"device_peak": 1', '"device_peak": NaN')),
     "device_peak is nan"),
    (lambda entry: entry.write_text(entry.read_text().replace('"device_peak": 1', '"device_peak": -1')),
     "device_peak is -1"),
    (lambda entry: (entry.unlink(), entry.mkdir()), "Is a directory"),
], ids=["empty-object", "list", "truncated", "huge-negative-peak", "nan-peak", "negative-peak", "folder"])
def test_a_broken_cache_entry_is_named_once_and_recomputed(tmp_path, monkeypatch, capsys, damage, problem):
    cache = tmp_path / "cache"
    good, asked, _ = plan_with(cache, monkeypatch, capsys)
    entries = sorted(cache.glob("*.json"))
    assert asked == [1, 2, 4, 8] and len(entries) == 4
    damage(entries[0])
    plan, asked, err = plan_with(cache, monkeypatch, capsys)
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and problem in warnings[0], err
    assert warnings[0].startswith(f"warning: memory-plan cache entry {entries[0]} is broken ("), err
    assert asked and plan.chosen.memory == good.chosen.memory
    if entries[0].is_file():  # the fresh reading replaced the broken one: the next plan is quiet and cached
        assert plan_with(cache, monkeypatch, capsys)[1:] == ([], "")


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unusable_cache_location_plans_without_caching_with_one_note(tmp_path, monkeypatch, capsys, where):
    cache = tmp_path / "a_file"
    cache.write_text("not a folder")
    if where == "under a file":
        cache = cache / "cache"
    elif where == "read-only":
        cache = tmp_path / "read_only"
        cache.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(cache)],
                                 capture_output=True)
        if mounted.returncode:
            pytest.skip("cannot mount a read-only file system here")
    try:
        plan, asked, err = plan_with(cache, monkeypatch, capsys)
    finally:
        if where == "read-only":
            subprocess.run(["umount", str(cache)], check=True)
    notes = err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: cannot write the memory-plan cache {cache} ("), err
    assert asked == [1, 2, 4, 8] and plan.chosen.micro_batch_size == 8
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_the_cache_key_covers_every_file_the_simulation_runs(tmp_path, monkeypatch):
    """The key is derived from what the simulated step imports, not from a hand-kept list: the span attention and
    Baichuan's model file (imported by the step) are in it, and changing any file's bytes changes the key."""
    from finetune.plan import memory_cache

    names = {path.relative_to(memory_cache.REPO_ROOT).as_posix() for path in memory_cache.simulating_files()}
    assert {"finetune/plan/memory.py", "finetune/plan/memory_step.py", "finetune/plan/torch_internals.py",
            "finetune/ops/chunked_loss.py", "finetune/ops/span_attention.py", "finetune/distributed/sharding.py",
            "modeling_baichuan.py"} <= names
    files = [tmp_path / "a.py", tmp_path / "b.py"]
    for path in files:
        path.write_text("x = 1\n")
    monkeypatch.setattr(memory_cache, "simulating_files", lambda: tuple(files))
    before = memory_cache._cache_key({"hidden_size": 8}, {"block_size": 16}, 1, 1)
    files[1].write_text("x = 2\n")
    assert memory_cache._cache_key({"hidden_size": 8}, {"block_size": 16}, 1, 1) != before
