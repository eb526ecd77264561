"""The training scripts end to end: batching, masks, loss normalisation, parallel equivalence, demo, reload."""
import json
import re
import textwrap

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_script, torchrun
from safetensors.torch import load_file

import finetune.data.batches as fu

import finetune.plan.layout as plan
from finetune.errors import FinetuneError

TRAIN = {"llama": REPO_ROOT / "train_llama2.py", "baichuan": REPO_ROOT / "train_baichuan2_13b.py"}


def read_metrics(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------
# Batching and masks
# ---------------------------------------------------------------------------------------------------------

def test_packing_fills_rows_without_losing_or_repeating_examples():
    lengths = np.random.default_rng(0).integers(5, 300, 500)
    rows = fu.pack_examples(lengths, 512, np.random.default_rng(1).permutation(500))
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # Packing keeps rows nearly full: within 10% of the ideal row count.
    assert len(rows) <= 1.1 * lengths.sum() / 512 + 1
    again = fu.pack_examples(lengths, 512, np.random.default_rng(1).permutation(500))
    assert again == rows


def test_plan_is_deterministic_per_seed_and_epoch_and_drops_the_last_partial_batch():
    lengths = np.random.default_rng(0).integers(5, 100, 103)
    one_per_row = fu.plan_epoch(lengths, 10, 128, "block", seed=3, epoch=0)
    assert len(one_per_row) == 10 and all(len(step) == 10 for step in one_per_row)
    assert one_per_row == fu.plan_epoch(lengths, 10, 128, "block", seed=3, epoch=0)
    assert one_per_row != fu.plan_epoch(lengths, 10, 128, "block", seed=3, epoch=1)
    assert one_per_row != fu.plan_epoch(lengths, 10, 128, "block", seed=4, epoch=0)
    packed = fu.plan_epoch(lengths, 4, 128, "packed", seed=3, epoch=0)
    assert len(packed) < len(fu.plan_epoch(lengths, 4, 128, "block", seed=3, epoch=0)) / 2


def test_ranks_take_disjoint_shares_of_each_global_batch():
    rows = [[i] for i in range(8)]
    shares = [fu.rank_micro_batches(rows, r, 2, 2) for r in range(2)]
    assert shares[0] == [[[0], [1]], [[2], [3]]] and shares[1] == [[[4], [5]], [[6], [7]]]


class _Table:
    """A TokenTable stand-in holding given examples."""

    def __init__(self, examples):
        self.examples = examples
        self.lengths = np.array([len(ids) for ids, _ in examples])

    def example(self, index):
        ids, labels = self.examples[index]
        return np.array(ids), np.array(labels)


def example_ids(batch, examples_per_row):
    """1, 2, ... per example of each row and 0 on its padding tail (outside every span)."""
    ids = torch.zeros_like(batch["input_ids"])
    for row, (spans, count) in enumerate(zip(batch["example_spans"], examples_per_row)):
        for number, (start, end) in enumerate(spans[:count], start=1):
            ids[row, start:end] = number
    return ids


def test_collate_marks_examples_and_padding_from_true_lengths():
    pad_id = 0
    # The second example contains token 0, which equals the pad id: it must stay a real, trained token.
    table = _Table([([1, 5, 6, 2], [-100, -100, 6, 2]), ([1, 0, 7, 2], [-100, 0, 7, 2])])
    batch = fu.collate_rows(table, [[0, 1]], pad_id, pad_to=10)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 1, 0, 7, 2, 0, 0]]
    assert example_ids(batch, [2]).tolist() == [[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    # The first token of each example is never a target (it would be predicted from the previous example).
    assert batch["labels"].tolist() == [[-100, -100, 6, 2, -100, 0, 7, 2, -100, -100]]
    assert batch["example_spans"] == [[(0, 4), (4, 8)]]  # the padding tail is in no span: no attention
    assert batch["num_tokens"] == 8 and batch["num_targets"] == 5
    assert batch["attended_pairs"] == 2 * (4 * 5 // 2)
    longest = fu.collate_rows(table, [[0], [1]], pad_id)
    assert longest["input_ids"].shape == (2, 4)


def test_token_table_counts_targets_after_the_first_token(tiny_run):
    dataset = fu.load_prepared_dataset(tiny_run["data"])
    table = fu.TokenTable(dataset["train"])
    row = dataset["train"][0]
    assert table.lengths[0] == len(row["input_ids"])
    assert table.num_targets[0] == sum(1 for label in row["labels"][1:] if label != -100)


def _packed_vs_separate_losses(model, examples, packed_kwargs):
    table = _Table(examples)
    packed = fu.collate_rows(table, [list(range(len(examples)))], pad_id=0, pad_to=64)
    total = packed["num_targets"]
    with torch.no_grad():
        loss_packed = model(input_ids=packed["input_ids"], labels=packed["labels"], num_items_in_batch=total,
                            use_cache=False, **packed_kwargs(packed)).loss
        summed = 0.0
        for ids, labels in examples:
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), num_items_in_batch=1)
            summed += out.loss.item()
    return loss_packed.item(), summed / total


@pytest.mark.parametrize("kind, attention", [("llama", "packed_spans"), ("llama", "sdpa"), ("baichuan", "spans"),
                                             ("baichuan", None)])
def test_packed_row_loss_equals_token_weighted_loss_of_examples_run_one_by_one(tiny_run, kind, attention):
    from transformers import AutoModelForCausalLM

    import finetune.ops.span_attention  # noqa: F401
    import modeling_baichuan  # noqa: F401

    extra = {"attn_implementation": attention} if kind == "llama" else {}
    model = AutoModelForCausalLM.from_pretrained(tiny_run[kind], dtype=torch.float32, **extra).eval()
    rng = np.random.default_rng(0)
    examples = []
    for length in (13, 21, 9, 17):
        ids = [1] + rng.integers(3, 128, length - 2).tolist() + [2]
        examples.append((ids, [-100] * (length // 2) + ids[length // 2:]))
    if attention == "packed_spans":  # what train_llama2.py does: attention within each example's span
        kwargs = lambda b: {"position_ids": b["position_ids"], "example_spans": b["example_spans"]}  # noqa: E731
    elif kind == "llama":  # transformers' own route: a block-diagonal mask built from restarting positions
        kwargs = lambda b: {"position_ids": b["position_ids"]}  # noqa: E731
    elif attention == "spans":  # what train_baichuan2_13b.py does: restarting positions and the spans
        kwargs = lambda b: {"position_ids": b["position_ids"], "example_spans": b["example_spans"]}  # noqa: E731
    else:  # example ids in attention_mask alone: the model's block-diagonal mask
        kwargs = lambda b: {"attention_mask": example_ids(b, [len(examples)]),  # noqa: E731
                            "position_ids": b["position_ids"]}
    packed, separate = _packed_vs_separate_losses(model, examples, kwargs)
    assert packed == pytest.approx(separate, abs=1e-5)


def test_packed_rows_for_the_rotary_baichuan_variant_match_separate_runs():
    import modeling_baichuan

    torch.manual_seed(0)
    config = modeling_baichuan.BaichuanConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, position_embedding="rope")
    model = modeling_baichuan.BaichuanForCausalLM(config).eval()
    examples = [([1, 5, 9, 14, 2], [-100, -100, 9, 14, 2]), ([1, 7, 3, 3, 8, 11, 2], [-100, 7, 3, 3, 8, 11, 2])]
    spans = lambda b: {"position_ids": b["position_ids"], "example_spans": b["example_spans"]}  # noqa: E731
    packed, separate = _packed_vs_separate_losses(model, examples, spans)
    assert packed == pytest.approx(separate, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Plan arithmetic
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params", [
    ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
    ("meta-llama/Llama-2-13b-hf", 13_015_864_320),
    ("baichuan-inc/Baichuan2-13B-Base", 13_896_668_160),
])
def test_parameter_counts_of_known_models(name, params):
    assert plan.count_parameters(plan.KNOWN_CONFIGS[name]) == params


def test_global_batch_split_into_micro_batches_and_accumulation():
    assert plan.split_global_batch(256, 8, None, "cuda") == (32, 1)
    assert plan.split_global_batch(256, 8, 4, "cuda") == (4, 8)
    # On CPU about 2048 tokens per forward: 2 rows of 1024; rows of 128 up to the whole share.
    assert plan.split_global_batch(24, 2, None, "cpu", 1024) == (2, 6)
    assert plan.split_global_batch(24, 2, None, "cpu", 128) == (12, 1)
    assert plan.split_global_batch(8, 1, None, "cpu", 128) == (8, 1)
    assert plan.split_global_batch(24, 1, None, "cuda") == (8, 3)
    with pytest.raises(FinetuneError, match="not divisible by the 4 processes"):
        plan.split_global_batch(10, 4)
    with pytest.raises(FinetuneError, match="--micro-batch-size 3 does not divide"):
        plan.split_global_batch(16, 2, 3)


def plan_facts(stdout):
    return dict(line.strip().split(": ", 1) for line in stdout.splitlines() if line.startswith("  ") and ": " in line
                and not line.startswith("    "))


@pytest.mark.slow
def test_plan_only_prints_the_simulated_plan_without_loading_weights():
    """Llama 2 13B, full fine-tuning: 8 x 80 GB fits without offload, 1 x 80 GB only with CPU offload."""
    eight = run_script(PYTHON, str(TRAIN["llama"]), "--plan-only", "--num-devices", "8", "--device-memory-gb", "80")
    assert eight.returncode == 0, eight.stderr
    facts = plan_facts(eight.stdout)
    assert "[parallel plan]" in eight.stdout and "number of candidates" in eight.stdout
    assert facts["world_size"] == "8" and facts["parameters"] == "13015864320"
    assert facts["fits"] == "true" and facts["cpu_offload"] == "false"
    assert 40 < float(facts["memory_gib_per_device"]) <= 80 * 0.92
    one = run_script(PYTHON, str(TRAIN["llama"]), "--plan-only", "--num-devices", "1", "--device-memory-gb", "80")
    facts = plan_facts(one.stdout)
    assert facts["fits"] == "true" and facts["cpu_offload"] == "true"
    assert float(facts["host_memory_gib_per_device"]) > 13e9 * 12 / 2 ** 30  # master weights, grads, AdamW
    off = run_script(PYTHON, str(TRAIN["llama"]), "--plan-only", "--num-devices", "1", "--cpu-offload", "off")
    assert plan_facts(off.stdout)["fits"] == "false"


# ---------------------------------------------------------------------------------------------------------
# Runs: one process vs two, micro-batch split, batching modes
# ---------------------------------------------------------------------------------------------------------

COMMON = ["--block-size", "128", "--batch-size", "8", "--max-steps", "4", "--lr", "1e-2", "--log-interval", "1",
          "--seed", "0", "--num-workers", "0"]


def _train(kind, tiny_run, out, *extra, nproc=1):
    args = ["--model-name-or-path", tiny_run[kind], "--dataset-name-or-path", tiny_run["data"],
            "--save-model-dir", str(out), *COMMON, *extra]
    result = torchrun(nproc, TRAIN[kind], *args) if nproc > 1 else run_script(PYTHON, str(TRAIN[kind]), *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.distributed
def test_a_finished_two_process_run_frees_its_sharded_model_before_exit(tiny_run, tmp_path):
    """Left to interpreter exit, the sharded parameters' process-group state was torn down during finalisation,
    and a finished run sometimes aborted there (SIGABRT). The script's entry must free them when main() ends."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n" + textwrap.dedent("""
        import gc
        from torch.distributed.tensor import DTensor
        import train_baichuan2_13b
        code = train_baichuan2_13b.main(sys.argv[1:])
        gc.disable()  # count what main() left behind, not what a collection would free now
        alive = sum(isinstance(o, DTensor) for o in gc.get_objects())
        sys.stdout.write(f"alive DTensors: {alive}\\n")  # one write: the two ranks' lines must not interleave
        sys.stdout.flush()
        sys.exit(code)
    """))
    args = ["--model-name-or-path", tiny_run["baichuan"], "--dataset-name-or-path", tiny_run["data"],
            "--save-model-dir", str(tmp_path / "out"), *COMMON]
    result = torchrun(2, probe, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("alive DTensors: 0") == 2, result.stdout[-3000:]


def _assert_same_run(a, b, tol):
    losses_a = [r["loss"] for r in read_metrics(a)]
    losses_b = [r["loss"] for r in read_metrics(b)]
    assert len(losses_a) == len(losses_b) == 4
    assert losses_a == pytest.approx(losses_b, abs=tol)
    assert [r["tokens"] for r in read_metrics(a)] == [r["tokens"] for r in read_metrics(b)]
    weights_a, weights_b = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=tol, rtol=0)


@pytest.fixture(scope="module")
def single_llama_run(tiny_run):
    out = tiny_run["root"] / "single_llama"
    result = _train("llama", tiny_run, out)
    return out, result


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "baichuan"])
def test_two_processes_match_one_process(tiny_run, single_llama_run, kind):
    if kind == "llama":
        single = single_llama_run[0]
    else:
        single = tiny_run["root"] / "single_baichuan"
        _train(kind, tiny_run, single)
    double = tiny_run["root"] / f"double_{kind}"
    _train(kind, tiny_run, double, nproc=2)
    _assert_same_run(single, double, 1e-4)
    # The two-process folder is an ordinary model folder.
    from transformers import AutoModelForCausalLM

    import modeling_baichuan  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(str(double))
    assert model.config.architectures[0] in ("LlamaForCausalLM", "BaichuanForCausalLM")


@pytest.mark.slow
def test_cpu_offload_under_fsdp2_trains_like_one_process(tiny_run, single_llama_run):
    """FSDP2's CPUOffloadPolicy (--cpu-offload on) over two processes: the same run as one process."""
    offloaded = tiny_run["root"] / "offloaded_llama"
    result = _train("llama", tiny_run, offloaded, "--cpu-offload", "on", nproc=2)
    assert "cpu_offload: true" in result.stdout
    # the cost of loading offloaded shards is said: the weights go from rank 0 over gloo
    assert "note: --cpu-offload on: rank 0 sends the weights to the other 1 rank(s) over gloo" in result.stdout
    _assert_same_run(single_llama_run[0], offloaded, 1e-4)


@pytest.mark.slow
def test_micro_batches_with_accumulation_give_the_same_update(tiny_run, single_llama_run):
    split = tiny_run["root"] / "micro2"
    result = _train("llama", tiny_run, split, "--micro-batch-size", "2")
    assert "accumulation_steps: 4" in result.stdout
    _assert_same_run(single_llama_run[0], split, 1e-5)


@pytest.mark.slow
def test_chunked_loss_run_matches_the_plain_loss(tiny_run, single_llama_run, tmp_path):
    """--chunked-loss on (the GPU default): same losses and weights as the plain loss, never whole-batch logits."""
    out = tmp_path / "chunked"
    _train("llama", tiny_run, out, "--chunked-loss", "on")
    _assert_same_run(single_llama_run[0], out, 1e-5)


@pytest.mark.slow
def test_log_line_and_metrics_rows(single_llama_run):
    out, result = single_llama_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("[Step")]
    assert re.fullmatch(r"\[Step 1/4\] \| Loss: \d+\.\d+ \| Duration: \d+\.\d+ \| Throughput: \d+\.\d+ tokens/sec.*",
                        lines[0])
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"step", "epoch", "loss", "lr", "tokens", "step_time", "tokens_per_sec", "mfu",
                "peak_memory_gib"} <= row.keys()
        assert row["tokens"] > 0 and row["tokens_per_sec"] > 0
    assert "val_loss" in rows[-1]  # validation at the end of the (shortened) epoch


@pytest.mark.slow
def test_batching_modes_count_only_real_tokens(tiny_run, single_llama_run):
    packed_tokens = [r["tokens"] for r in read_metrics(single_llama_run[0])]
    block = tiny_run["root"] / "block"
    _train("llama", tiny_run, block, "--pad-to-block-size")
    block_rows = read_metrics(block)
    # One example per row: a step holds 8 examples, far fewer real tokens than 8 packed rows of 128.
    assert all(r["tokens"] < 8 * 60 for r in block_rows)
    assert all(t > 8 * 60 for t in packed_tokens)
    longest = tiny_run["root"] / "longest"
    _train("llama", tiny_run, longest, "--batching", "longest")
    # Same rows in the same order as the tutorial's batching: only the padding differs, so the losses agree.
    assert [r["loss"] for r in read_metrics(longest)] == pytest.approx([r["loss"] for r in block_rows], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The demo: trains, learns, saves, reloads, generates
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind, recipe", [("llama", "llama2"), ("baichuan", "baichuan2")])
def test_demo_learns_saves_and_generates(tmp_path, kind, recipe):
    out = tmp_path / "demo"
    result = run_script(PYTHON, str(TRAIN[kind]), "--demo", "--max-steps", "10", "--batch-size", "2",
                        "--block-size", "512", "--log-interval", "2", "--save-model-dir", str(out), "--num-workers", "0",
                        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    assert "val_loss" in rows[-1]
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    generated = run_script(PYTHON, str(REPO_ROOT / "inference.py"), "--model-dir", str(out), "--recipe", recipe,
                           "--max-new-tokens", "8")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "--- greedy ---" in generated.stdout and "--- sampled ---" in generated.stdout


def test_inference_rejects_bad_examples_with_one_line(tiny_run, capsys):
    import inference

    with pytest.raises(SystemExit, match="not valid JSON"):
        inference.main(["--model-dir", tiny_run["llama"], "--recipe", "llama2", "--example", '{"article": '])
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        inference.main(["--model-dir", tiny_run["baichuan"], "--recipe", "baichuan2",
                        "--example", '{"instruction": "Where is my parcel?"}'])
    # entry_point: the exit message is the one error line (the interpreter prints it, exit status 1)
    assert re.fullmatch(r"error: the example lacks column\(s\) \['category', 'intent'\] .*", raised.value.code)


def test_inference_chat_prompt_uses_the_baichuan_chat_tokens(tiny_run):
    from transformers import AutoTokenizer

    import inference
    from finetune import demo

    ids = inference.prompt_ids(demo.load_demo_tokenizer("baichuan2"), "baichuan2", {"instruction": "w5 w6"}, chat=True)
    assert ids[0] == 195 and ids[-1] == 196
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["baichuan"])
    recipe_ids = inference.prompt_ids(tokenizer, "baichuan2",
                                      {"instruction": "w5", "category": "w7", "intent": "w8"}, chat=False)
    assert 195 not in recipe_ids
