"""finetune/checkpoint/run_record.py: what a run is beyond its flags, and each way a resumed run differs from it."""
import json

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from finetune.checkpoint import run_record
from finetune.training import warmup_cosine_schedule

TOTAL_STEPS = 20


def token_loss(logits, targets, batch, positions):
    """The script's loss."""
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")


def token_loss_commented(logits, targets, batch, positions):
    """Another docstring."""
    # a comment that changes nothing
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")


def smoothed(logits, targets, batch, positions):
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none",
                                             label_smoothing=0.1)


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2))


def record(edit=None, loss=token_loss):
    """The record of the training script's optimiser, schedule and loss, after `edit(model)` returns
    (optimiser, scheduler) or None for the script's own."""
    model = tiny_model()
    made = edit(model) if edit else None
    if made is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        made = optimizer, warmup_cosine_schedule(optimizer, TOTAL_STEPS, 0.1, 0.1)
    return run_record.describe(model, *made, TOTAL_STEPS, loss)


def constant_lr(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return optimizer, LambdaLR(optimizer, lambda step: 1.0)


def adafactor(model):
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-3)
    return optimizer, warmup_cosine_schedule(optimizer, TOTAL_STEPS, 0.1, 0.1)


def embeddings_apart(model):
    embeddings = [p for n, p in model.named_parameters() if "embed" in n]
    rest = [p for n, p in model.named_parameters() if "embed" not in n]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": embeddings, "lr": 1e-4}], lr=1e-3)
    return optimizer, warmup_cosine_schedule(optimizer, TOTAL_STEPS, 0.1, 0.1)


def bottom_half_frozen(model):
    model.model.layers[0].requires_grad_(False)


def other_betas(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    return optimizer, warmup_cosine_schedule(optimizer, TOTAL_STEPS, 0.1, 0.1)


def test_the_record_holds_the_optimiser_groups_schedule_trainables_and_loss_as_json():
    described = record()
    assert json.loads(json.dumps(described)) == described
    optimizer = described["optimizer"]
    assert optimizer["class"] == "torch.optim.adamw.AdamW" and len(optimizer["param_groups"]) == 1
    group = optimizer["param_groups"][0]
    assert group["tensors"] == 21 and group["settings"]["initial_lr"] == 1e-3 and group["settings"]["betas"] == [
        0.9, 0.999]
    assert "lr" not in group["settings"] and "foreach" not in group["settings"]  # the scheduled rate, the device's
    assert described["scheduler"]["class"] == "torch.optim.lr_scheduler.LambdaLR"
    assert [step for step, _ in described["scheduler"]["factors"]] == [0, 1, 2, 5, 10, 15, 19]
    assert ["model.embed_tokens.weight", [64, 16]] in described["trainable"]
    assert described["token_loss"]["name"] == "token_loss"
    summary = run_record.summary(described)  # run_config.json: a count, not the names; flat for the trackers
    assert summary["trainable"]["tensors"] == 21 and summary["optimizer"]["param_groups"][0]["tensors"] == 21
    assert summary["scheduler"]["factors"]["19"] == described["scheduler"]["factors"][-1][1]
    from finetune.observe.trackers import flat_config
    assert all(len(str(value)) < 200 for value in flat_config(json.loads(json.dumps(summary))).values())


def test_the_same_run_has_no_difference_and_comments_or_docstrings_do_not_count():
    assert run_record.differences(record(), record()) == []
    assert run_record.differences(record(), record(loss=token_loss_commented)) == []


@pytest.mark.parametrize("edit, loss, first", [
    (constant_lr, token_loss, "the learning-rate schedule: its factor at step 0 is 1 now, 0.5 then"),
    (adafactor, token_loss, "the optimiser: Adafactor now, AdamW then"),
    (embeddings_apart, token_loss, "the optimiser's parameter groups: 2 now, 1 then"),
    (other_betas, token_loss, "parameter group 0's betas: [0.9, 0.95] now, [0.9, 0.999] then"),
    (bottom_half_frozen, token_loss, "the trainable parameters: model.layers.0.self_attn.q_proj.weight and 8 more "
                                     "are frozen now and trained then"),
    (None, smoothed, "the loss: token_loss() is not the code the run being resumed trained with"),
])
def test_each_edit_is_named_by_its_first_difference(edit, loss, first):
    found = run_record.differences(record(), record(edit, loss))
    assert found[0] == first, found
    line = run_record.refusal("ck/step-00000004", found)
    assert "\n" not in line and line.startswith(first)
    assert "--overwrite" in line and "--resume-changed" in line and "Nothing was deleted" in line


def test_a_rate_changed_in_one_group_is_its_initial_lr():
    def lower(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
        return optimizer, warmup_cosine_schedule(optimizer, TOTAL_STEPS, 0.1, 0.1)
    assert run_record.differences(record(), record(lower)) == [
        "parameter group 0's initial_lr: 0.0005 now, 0.001 then"]


def test_the_optimiser_state_is_kept_only_for_the_same_layout():
    assert run_record.same_optimizer_layout(record(), record(constant_lr))
    assert run_record.same_optimizer_layout(record(), record(other_betas))
    assert not run_record.same_optimizer_layout(record(), record(adafactor))
    assert not run_record.same_optimizer_layout(record(), record(embeddings_apart))
    assert not run_record.same_optimizer_layout(record(), record(bottom_half_frozen))


def test_fast_forward_gives_the_rate_of_the_resumed_step():
    model = tiny_model()
    stepped, fresh = (torch.optim.AdamW(model.parameters(), lr=1e-3) for _ in range(2))
    reference, forwarded = (warmup_cosine_schedule(o, TOTAL_STEPS, 0.1, 0.1) for o in (stepped, fresh))
    for _ in range(7):
        stepped.step()
        reference.step()
    run_record.fast_forward(forwarded, 7)
    assert forwarded.last_epoch == reference.last_epoch == 7
    assert fresh.param_groups[0]["lr"] == stepped.param_groups[0]["lr"]


def test_code_fingerprint_without_source_falls_back_to_the_code():
    namespace = {}
    exec("def f(x):\n    return x + 1\n", namespace)  # no source file to read
    exec("def g(x):\n    return x + 2\n", namespace)
    assert run_record.code_fingerprint(namespace["f"]) != run_record.code_fingerprint(namespace["g"])
    assert run_record.code_fingerprint(None) is None
