"""The chunked causal-LM loss gives the model's own loss and gradients, and holds far less memory.

Also a script: `torchrun --nproc_per_node 2 tests/test_chunked_loss.py` compares the chunked and the plain
loss under FSDP2 (gloo, one unit per decoder layer), as test_matches_under_fsdp2_two_processes does.
"""
import copy
import os
import sys
from pathlib import Path

import pytest
import torch

if __name__ != "__main__":
    from conftest import torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from finetune.ops.chunked_loss import chunked_causal_lm_loss, use_chunked_loss  # noqa: E402

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# Two packed rows of 24 tokens: (start, end) of each example; its first label is -100, as the collator makes.
SPANS = [[(0, 10), (10, 24)], [(0, 7), (7, 15), (15, 24)]]


def packed_attention_available():
    for name in ("finetune.ops.span_attention", "packed_attention"):
        try:
            __import__(name)
            return True
        except ImportError:
            continue
    return False


def tiny_model(kind, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import modeling_baichuan

    torch.manual_seed(seed)
    if kind == "llama":
        attention = "packed_spans" if packed_attention_available() else "sdpa"
        config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    position = {"baichuan-alibi": "alibi", "baichuan-rope": "rope"}[kind]
    config = modeling_baichuan.BaichuanConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, model_max_length=64,
                                              position_embedding=position, norm_head=True)
    return modeling_baichuan.BaichuanForCausalLM(config)


def packed_batch(vocab_size, spans=SPANS, length=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (len(spans), length), generator=generator)
    labels = ids.clone()
    positions = torch.zeros_like(ids)
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            labels[row, start] = -100  # first token of each packed example
            labels[row, start + 1:start + 3] = -100  # a short prompt without loss
            positions[row, start:end] = torch.arange(end - start)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "example_spans": spans,
            "use_cache": False}


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "baichuan-alibi", "baichuan-rope"])
@pytest.mark.parametrize("chunk_tokens", [5, 1024])
def test_same_loss_and_gradients_as_the_model(kind, chunk_tokens):
    plain = tiny_model(kind)
    chunked = use_chunked_loss(copy.deepcopy(plain), chunk_tokens=chunk_tokens)
    batch = packed_batch(plain.config.vocab_size)
    global_targets = 97  # as if other micro-batches and ranks held more targets
    expected_loss, expected_grads = loss_and_grads(plain, batch, num_items_in_batch=global_targets)
    loss, grads = loss_and_grads(chunked, batch, num_items_in_batch=global_targets)
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOLERANCE, msg=name)


def test_without_num_items_it_averages_over_its_own_targets():
    plain = tiny_model("baichuan-alibi")
    chunked = use_chunked_loss(copy.deepcopy(plain), chunk_tokens=7)
    batch = packed_batch(plain.config.vocab_size)
    torch.testing.assert_close(chunked(**batch).loss, plain(**batch).loss, **TOLERANCE)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(chunked(**batch, num_items_in_batch=targets).loss, chunked(**batch).loss,
                               **TOLERANCE)


def test_function_matches_cross_entropy_of_full_logits():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=generator)
    labels[0, :4] = -100
    labels[2, :] = -100  # a row without targets
    loss = chunked_causal_lm_loss(hidden, weight, labels, num_items_in_batch=13, chunk_tokens=4)
    grads = torch.autograd.grad(loss, (hidden, weight))
    logits = hidden[:, :-1] @ weight.t()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum") / 13
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(loss, expected, **TOLERANCE)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **TOLERANCE)


def test_bf16_autocast_follows_the_model():
    plain = tiny_model("llama")
    chunked = use_chunked_loss(copy.deepcopy(plain), chunk_tokens=5)
    batch = packed_batch(plain.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected_grads = loss_and_grads(plain, batch, num_items_in_batch=50)
        loss, grads = loss_and_grads(chunked, batch, num_items_in_batch=50)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=2e-2, atol=2e-2)
    for name, grad in expected_grads.items():
        assert grads[name].dtype == grad.dtype, name
        torch.testing.assert_close(grads[name], grad, rtol=5e-2, atol=5e-3, msg=name)


def test_generation_calls_keep_the_model_forward():
    model = use_chunked_loss(tiny_model("llama")).eval()
    ids = torch.randint(3, 300, (1, 6))
    assert model(input_ids=ids).logits.shape == (1, 6, 300)
    with torch.no_grad():
        assert model.train()(input_ids=ids).logits.shape == (1, 6, 300)


def test_refuses_a_z_loss():
    model = tiny_model("baichuan-alibi")
    model.config.z_loss_weight = 0.1
    with pytest.raises(ValueError, match="z-loss"):
        use_chunked_loss(model)


def peak_bytes(chunked, tokens=4 * 1024, vocab=125696, hidden=64):
    """Tracker peak of hidden -> head -> loss -> backward at Baichuan2's vocabulary, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        hidden_states = torch.randn(4, tokens // 4, hidden, requires_grad=True)
        weight = torch.randn(vocab, hidden, requires_grad=True)
        labels = torch.randint(0, vocab, (4, tokens // 4))
        tracker = MemTracker()
        tracker.track_external(hidden_states, weight, labels)
        with tracker:
            if chunked:
                loss = chunked_causal_lm_loss(hidden_states, weight, labels, tokens)
            else:
                logits = hidden_states @ weight.t()
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab),
                                                         labels[:, 1:].reshape(-1), reduction="sum") / tokens
            loss.backward()
        return max(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"], 0)


def test_holds_far_less_memory_than_full_logits():
    plain, chunked = peak_bytes(chunked=False), peak_bytes(chunked=True)
    one_logits_copy = 4 * 1024 * 125696 * 4
    assert chunked < plain - 2 * one_logits_copy, (plain, chunked)


@pytest.mark.distributed
def test_matches_under_fsdp2_two_processes():
    result = torchrun(2, Path(__file__).resolve(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("chunked loss matches under FSDP2") == 3, result.stdout


def fsdp2_check(kind):
    """Plain and chunked loss of the same sharded model on each rank's own rows: equal loss and gradients."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    patch_after_sharding = kind == "baichuan-rope"  # either order works
    models = []
    for chunked in (False, True):
        model = tiny_model(kind)
        if chunked and not patch_after_sharding:
            use_chunked_loss(model, chunk_tokens=5)
        layers = list(model.model.layers)
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        for unit in [*layers, model]:
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        if chunked and patch_after_sharding:
            use_chunked_loss(model, chunk_tokens=5)
        models.append(model)
    batch = packed_batch(300, spans=SPANS[rank:rank + 1], seed=10 + rank)
    global_targets = 2 * 40
    results = []
    for model in models:
        loss = model(**batch, num_items_in_batch=global_targets).loss
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        results.append((total, {n: p.grad.full_tensor() for n, p in model.named_parameters()}))
    (expected_loss, expected_grads), (loss, grads) = results
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOLERANCE, msg=name)
    if rank == 0:
        print(f"{kind}: chunked loss matches under FSDP2", flush=True)


def main():
    import torch.distributed as dist

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo")
    try:
        for kind in ("llama", "baichuan-alibi", "baichuan-rope"):
            fsdp2_check(kind)
    finally:
        dist.destroy_process_group()
    # Every check has run and printed; skip interpreter teardown, where a loaded machine has seen gloo's threads
    # abort the process ("terminate called without an active exception") after the work was done.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()


class HostToDeviceWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operations that, on a GPU, copy host data into a device tensor or read a device value back
    (each a stream sync): a tensor made from Python data (lift_fresh, scalar_tensor) and .item()."""

    SYNCING = ("lift_fresh", "scalar_tensor", "_local_scalar_dense")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNCING):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_host_count_makes_no_tensor_and_reads_nothing_back():
    """The training scripts pass the global batch's target count as a Python int: turning it into a device
    tensor every micro-batch would sync the stream on a GPU."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 8, generator=generator, requires_grad=True)
    weight = torch.randn(16, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 16, (2, 6), generator=generator)
    with HostToDeviceWatch() as watch:
        chunked_causal_lm_loss(hidden, weight, labels, num_items_in_batch=9, chunk_tokens=4).backward()
    assert watch.seen == []
    reference = torch.nn.functional.cross_entropy((hidden.detach() @ weight.detach().t())[:, :-1].reshape(-1, 16),
                                                  labels[:, 1:].reshape(-1), reduction="sum") / 9
    torch.testing.assert_close(chunked_causal_lm_loss(hidden, weight, labels, 9, 4), reference)


def test_the_bf16_head_gradient_is_summed_in_fp32_and_rounded_once():
    """Over many chunks a bf16 running sum rounds once per chunk; the head's gradient must be as close to the
    exact one as a single rounding to bf16 allows (within two rounding steps of it)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 2049, 16, generator=generator)
    weight = torch.randn(32, 16, generator=generator) * 0.1
    labels = torch.randint(0, 32, (1, 2049), generator=generator)
    exact_weight = weight.double().requires_grad_()
    exact = torch.nn.functional.cross_entropy((hidden.double()[0, :-1] @ exact_weight.t()), labels[0, 1:],
                                              reduction="sum")
    exact.backward()
    half_weight = weight.bfloat16().requires_grad_()
    chunked_causal_lm_loss(hidden.bfloat16(), half_weight, labels, num_items_in_batch=1, chunk_tokens=16).backward()
    assert half_weight.grad.dtype == torch.bfloat16
    rounding = (exact_weight.grad.bfloat16().double() - exact_weight.grad).abs().max()
    error = (half_weight.grad.double() - exact_weight.grad).abs().max()
    assert error <= 2 * rounding, (error, rounding)


# ---- the script's own token loss, chunk by chunk ---------------------------------------------------------------

def smoothed_with_z_loss(logits, targets, positions=None):
    """The customising doc's loss edit: label smoothing plus a z-loss."""
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none",
                                             label_smoothing=0.1)
    return loss + 1e-4 * torch.logsumexp(logits, dim=-1).square()


@pytest.mark.parametrize("chunk_tokens", [5, None])
def test_a_token_loss_of_the_script_gives_the_loss_and_gradients_of_full_logits(chunk_tokens):
    from finetune.ops.chunked_loss import use_token_loss

    plain = tiny_model("llama")
    model = use_token_loss(copy.deepcopy(plain), chunk_tokens)
    batch = packed_batch(plain.config.vocab_size)
    loss, grads = loss_and_grads(model, batch, num_items_in_batch=50, token_loss=smoothed_with_z_loss)

    plain.zero_grad(set_to_none=True)
    logits = plain(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100).reshape(-1)
    per_token = smoothed_with_z_loss(logits.reshape(-1, logits.shape[-1]).float(), targets)
    expected = (per_token * (targets != -100)).sum() / 50
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), **TOLERANCE)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **TOLERANCE, msg=name)
    assert loss > model(**batch, num_items_in_batch=50).loss  # the edit changes the loss: not cross-entropy


def test_each_chunk_sees_its_own_positions_and_the_ignored_tokens_never_count():
    seen = []

    def nan_where_ignored(logits, targets, positions=None):
        seen.append((positions.start, positions.stop, logits.shape[0]))
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
        return loss.masked_fill(targets == -100, float("nan"))

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 8, generator=generator, requires_grad=True)
    weight = torch.randn(16, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 16, (2, 6), generator=generator)
    labels[0, :3] = -100
    loss = chunked_causal_lm_loss(hidden, weight, labels, 9, chunk_tokens=5, token_loss=nan_where_ignored)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert seen[:3] == [(0, 5, 5), (5, 10, 5), (10, 15, 2)]  # forward; backward walks them again
    torch.testing.assert_close(loss, chunked_causal_lm_loss(hidden, weight, labels, 9, chunk_tokens=5))


def test_misuse_under_the_chunked_loss_is_one_error_line():
    from finetune.errors import FinetuneError

    model = use_chunked_loss(tiny_model("llama"), chunk_tokens=5)
    batch = packed_batch(model.config.vocab_size)
    outputs = model(**batch)
    with pytest.raises(FinetuneError, match=r"outputs.logits: the chunked loss is on .*token_loss\(\)"):
        _ = outputs.logits
    without_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(FinetuneError, match="without labels=, while the chunked loss is on"):
        model(**without_labels)  # a training call: it would silently make the whole logits
    with pytest.raises(FinetuneError, match=r"token_loss must return one loss per token of its chunk, shape \(5,\)"):
        model(**batch, token_loss=lambda logits, targets, positions: logits.sum())


def test_without_chunks_the_output_keeps_its_logits():
    from finetune.ops.chunked_loss import use_token_loss

    plain = tiny_model("baichuan-rope")
    model = use_token_loss(copy.deepcopy(plain), None)
    batch = packed_batch(plain.config.vocab_size)
    outputs = model(**batch)
    torch.testing.assert_close(outputs.loss, plain(**batch).loss, **TOLERANCE)
    assert outputs.logits.shape == (2, 24, plain.config.vocab_size)
