"""finetune/plan/probe.py: the micro-batch probe measures the real training step, leaves no state behind, and ranks
agree (an out-of-memory rank ends the job instead of hanging the others)."""
import pytest
import textwrap
import types

import torch
from conftest import REPO_ROOT, torchrun


def _worker(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n" + textwrap.dedent(body))
    return path


# ---- the probe measures the training step, leaves nothing behind and cannot desync ranks ------------------

class FakeMemory:
    """Allocator figures of a device of `total` bytes whose step peak is `fixed + per_row x rows`."""

    def __init__(self, total, fixed, per_row):
        self.total_bytes, self.fixed, self.per_row = total, fixed, per_row
        self.rows, self.resets = 0, 0

    def total(self):
        return self.total_bytes

    def reset_peak(self):
        self.resets += 1

    def allocated(self):  # between steps: the weights (and the optimiser reserve), a little below the fixed part
        return self.fixed - 5

    def peak(self):
        return self.fixed + self.per_row * self.rows


def _probe_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    import finetune.ops.span_attention  # noqa: F401

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, attention_dropout=0.5, max_position_embeddings=64)
    return LlamaForCausalLM._from_config(config, attn_implementation="packed_spans").train()


def _training_forward(memory, seen):
    def forward(model, batch, num_items_in_batch):
        memory.rows = batch["input_ids"].shape[0]
        seen.append(batch)
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     example_spans=batch["example_spans"], labels=batch["labels"],
                     num_items_in_batch=num_items_in_batch, use_cache=False).loss
    return forward


@pytest.mark.slow
def test_probe_takes_the_largest_fitting_micro_batch_and_leaves_no_state():
    from finetune.plan.probe import probe_micro_batch

    model = _probe_model()
    backend = types.SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False),
                                    all_gather=lambda value: [value])
    memory, seen = FakeMemory(total=100, fixed=30, per_row=12), []
    rng_before = torch.get_rng_state()
    # 0.9 x 100 = 90 bytes hold 30 + 12 x 5; 5 does not divide 16 rows, 4 does.
    chosen = probe_micro_batch(model, backend, 8, 16, 32, _training_forward(memory, seen), memory=memory)
    assert chosen == 4
    assert torch.equal(torch.get_rng_state(), rng_before)  # dropout ran, yet the training draws are unchanged
    assert all(p.grad is None for p in model.parameters())
    assert memory.resets >= 3
    # The training step: packed rows (several spans a row), two micro-batches accumulated, at 1 and 2 rows.
    assert [b["input_ids"].shape[0] for b in seen[-4:]] == [1, 1, 2, 2]
    assert all(len(spans) > 1 for b in seen for spans in b["example_spans"])
    # Never above the plan's micro-batch, and one row where two would not fit.
    assert probe_micro_batch(model, backend, 2, 16, 32, _training_forward(memory, []), memory=memory) == 2
    tight = FakeMemory(total=100, fixed=50, per_row=30)
    assert probe_micro_batch(model, backend, 8, 16, 32, _training_forward(tight, []), memory=tight) == 1



@pytest.mark.slow
def test_the_probe_measures_in_training_mode_and_restores_the_mode():
    """from_pretrained leaves a model in eval mode, where checkpointed layers keep every activation: the probe
    must measure the training step in training mode, then leave the mode as it found it."""
    from finetune.plan.probe import probe_micro_batch

    model = _probe_model().eval()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backend = types.SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False),
                                    all_gather=lambda value: [value])
    memory, modes = FakeMemory(total=100, fixed=30, per_row=12), []
    measure = _training_forward(memory, [])

    def forward(model, batch, num_items_in_batch):
        modes.append((model.training, model.model.layers[0].training))
        return measure(model, batch, num_items_in_batch)
    probe_micro_batch(model, backend, 8, 16, 32, forward, memory=memory)
    assert modes and all(mode == (True, True) for mode in modes)
    assert not model.training and not model.model.layers[0].training


def test_no_rank_measures_two_rows_unless_every_rank_does():
    """Whether to measure two rows is agreed first: a rank measuring alone would run FSDP collectives that a rank
    which decided otherwise never joins. Here the other rank (through the gather) cannot fit two rows."""
    from finetune.plan.probe import probe_micro_batch

    other_rank = {bool: False, int: 1}
    backend = types.SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False),
                                    all_gather=lambda value: [value, other_rank[type(value)]])
    memory, seen = FakeMemory(total=100, fixed=30, per_row=12), []
    assert probe_micro_batch(_probe_model(), backend, 8, 16, 32, _training_forward(memory, seen), memory=memory) == 1
    assert [b["input_ids"].shape[0] for b in seen] == [1, 1]  # this rank alone would have measured 2 rows too


PROBE_RANKS = """
    import torch
    from finetune.distributed.backend import enable_advanced_parallelization
    from finetune.errors import entry_point
    from finetune.plan.probe import probe_micro_batch
    sys.path[:0] = {tests!r}
    from test_probe import FakeMemory, _probe_model, _training_forward

    @entry_point
    def main():
        backend = enable_advanced_parallelization("no")
        from finetune.distributed.sharding import shard_model
        model = _probe_model()
        shard_model(model)
        # Rank 1's device is smaller; with "oom", it runs out of memory in its first forward.
        memory = FakeMemory(total=100 if backend.rank == 0 else 70, fixed=30, per_row=12)
        forward = _training_forward(memory, [])
        if sys.argv[1] == "oom" and backend.rank == 1:
            def forward(model, batch, num_items_in_batch):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        chosen = probe_micro_batch(model, backend, 8, 16, 32, forward, memory=memory)
        sys.stdout.write(f"rank {{backend.rank}} chose {{chosen}}\\n")
        sys.stdout.flush()
        backend.shutdown()
    main()
"""


@pytest.mark.distributed
def test_probe_ranks_agree_and_an_out_of_memory_rank_ends_the_job(tmp_path):
    worker = _worker(tmp_path, "probe.py", PROBE_RANKS.format(tests=[str(REPO_ROOT / "tests" / "plan"), str(REPO_ROOT / "tests")]))
    agreed = torchrun(2, worker, "fit", timeout=180)
    assert agreed.returncode == 0, agreed.stderr[-3000:]
    # rank 1 holds 0.9 x 70 = 63 bytes: 30 + 12 x 2 -> both ranks take 2 (rank 0 alone would take 4)
    assert "rank 0 chose 2" in agreed.stdout and "rank 1 chose 2" in agreed.stdout
    oom = torchrun(2, worker, "oom", timeout=120)  # before: rank 0 waited in FSDP's collective for ever
    assert oom.returncode != 0
    assert "do not fit in GPU memory" in oom.stderr
    assert "chose" not in oom.stdout
