"""The router's load-balancing loss on packed rows: the model's own definition over real tokens only, weighted
like the cross-entropy across micro-batches, kept for the log from training calls only."""
import pytest
import torch
from model.test_model_families import examples, packed_batch, packed_forward
from model.test_moe import FAMILIES, build, moe_config

from finetune.ops import span_attention
from finetune.ops.chunked_loss import use_token_loss
from finetune.ops.router_loss import find_router_aux, router_aux_loss

COEF = 0.5


def padded_aux(reference, rows):
    """The model's own aux loss on the examples as a right-padded batch (the padding masked out)."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (row_ids, _) in enumerate(rows):
        ids[i, :len(row_ids)], mask[i, :len(row_ids)] = torch.tensor(row_ids), 1
    return reference(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss


def packed_loss(model, batch, num_items):
    return packed_forward(model, batch, labels=batch["labels"], num_items_in_batch=num_items).loss


@pytest.mark.parametrize("family", FAMILIES)
def test_aux_loss_is_the_models_own_over_the_real_tokens_of_a_packed_row(family):
    torch.manual_seed(0)
    config = moe_config(family, output_router_logits=True, router_aux_loss_coef=COEF)
    reference = build(config)
    rows = examples()
    batch = packed_batch(rows)  # one row of 31 tokens padded to 40: the tail must not count
    plain_config = moe_config(family, output_router_logits=False)
    with torch.no_grad():
        for chunk in (1024, None):
            with_aux = use_token_loss(build(config, span_attention.ATTENTION_NAME, reference.state_dict()), chunk)
            without = use_token_loss(build(plain_config, span_attention.ATTENTION_NAME, reference.state_dict()), chunk)
            aux = (packed_loss(with_aux, batch, batch["num_targets"])
                   - packed_loss(without, batch, batch["num_targets"])) / COEF
            assert aux.item() == pytest.approx(padded_aux(reference, rows).item(), abs=1e-5)
        # one example alone in a micro-batch: exactly the model's own aux loss on that example
        single = packed_batch(rows[1:2])
        alone = reference(input_ids=torch.tensor([rows[1][0]]), output_router_logits=True).aux_loss
        aux = (packed_loss(with_aux, single, None) - packed_loss(without, single, None)) / COEF
        assert aux.item() == pytest.approx(alone.item(), abs=1e-5)


def test_each_micro_batch_weighs_by_its_share_of_the_steps_targets_and_training_calls_are_kept():
    torch.manual_seed(0)
    config = moe_config("mixtral", output_router_logits=True, router_aux_loss_coef=COEF)
    reference = build(config)
    model = use_token_loss(build(config, span_attention.ATTENTION_NAME, reference.state_dict()))
    rows = examples(3)
    first, second = packed_batch(rows[:2]), packed_batch(rows[2:])
    total = first["num_targets"] + second["num_targets"]
    aux = router_aux_loss(model)
    assert find_router_aux(model) is model.router_aux and aux.coefficient == COEF
    model.train()
    for batch in (first, second):  # gradient accumulation over two micro-batches of one step
        packed_loss(model, batch, total).backward()
    want = sum(padded_aux(reference, part).item() * batch["num_targets"] / total
               for part, batch in ((rows[:2], first), (rows[2:], second)))
    assert model.router_aux.take().item() == pytest.approx(want, abs=1e-5)
    assert model.router_aux.take() is None  # taken once per step
    model.eval()
    with torch.no_grad():
        packed_loss(model, first, total)  # validation and the probe's calls are not the step's
    assert model.router_aux.take() is None


def test_a_dense_model_or_a_config_without_it_adds_no_aux_loss():
    assert router_aux_loss(build(moe_config("qwen3_moe", output_router_logits=False))) is None
    assert router_aux_loss(build(moe_config("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.0))) is None
    from model.test_model_families import build as build_dense, family_config
    dense = use_token_loss(build_dense(family_config("qwen2")))
    assert dense.router_aux is None and find_router_aux(dense) is None


def test_the_collators_layout_and_a_plain_span_list_give_the_same_aux_loss():
    torch.manual_seed(0)
    config = moe_config("qwen3_moe", output_router_logits=True, router_aux_loss_coef=COEF)
    model = build(config, span_attention.ATTENTION_NAME)
    batch = packed_batch(examples())
    aux = router_aux_loss(model)
    with torch.no_grad():
        logits = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             example_spans=batch["example_spans"], output_router_logits=True).router_logits
    plain = [list(row) for row in batch["example_spans"]]
    real = aux(logits, batch["example_spans"], 1, 40).item()
    assert real == pytest.approx(aux(logits, plain, 1, 40).item())
    assert abs(aux(logits, None, 1, 40).item() - real) > 1e-3  # no spans: the padding tail counts, and changes it
