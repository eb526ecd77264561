"""finetune/training.py: validation measures with its own cross-entropy whatever the script trains with, and
computes its figures (loss, token accuracy, the script's additions) in one pass."""
import copy

import pytest
import torch

from finetune.config import DataConfig
from finetune.data import batches
from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError
from finetune.ops.chunked_loss import use_token_loss
from finetune.training import Validation

CPU = Backend(engine="single", device=torch.device("cpu"))


def script_forward(model, batch, num_items_in_batch, token_loss=None):
    """The training scripts' forward, with a training loss that is not cross-entropy."""
    from functools import partial

    def smoothed(logits, targets, batch, positions):
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none",
                                                 label_smoothing=0.3)
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                 num_items_in_batch=num_items_in_batch, token_loss=partial(token_loss or smoothed, batch=batch),
                 use_cache=False).loss


def top5(logits, targets, batch, positions):
    counted = targets != -100
    hits = (logits.topk(5, dim=-1).indices == targets[:, None]).any(dim=-1) & counted
    return {"top5_accuracy": (hits.sum(), counted.sum()), "rows_seen": (batch["input_ids"].shape[0], 1)}


@pytest.fixture(scope="module")
def validation_split(tiny_run):
    data = DataConfig(tiny_run["data"], block_size=128)
    _, table = batches.load_token_tables(data)
    return table, batches.validation_rows(table, data, 0)


def reference_figures(model, table, rows):
    """Cross-entropy and accuracy of whole logits, row by row, the plain way."""
    loss_sum = correct = targets = 0
    with torch.no_grad():
        for row in rows:
            batch = batches.collate_rows(table, [row], 2, None)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           use_cache=False).logits[0, :-1]  # packed examples apart, as in training
            labels = batch["labels"][0, 1:]
            counted = labels != -100
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            correct += ((logits.argmax(-1) == labels) & counted).sum()
            targets += counted.sum()
    return (loss_sum / targets).item(), (correct / targets).item()


def learn_some_of(model, table, rows, steps=15):
    """A few steps on the split itself, so that some next tokens are right (a random model gets none)."""
    batch = batches.collate_rows(table, rows, 2, None)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
              use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("chunk_tokens", [None, 7])
def test_validation_measures_cross_entropy_accuracy_and_added_figures_in_one_pass(tiny_run, validation_split,
                                                                                 chunk_tokens):
    from transformers import AutoModelForCausalLM

    table, rows = validation_split
    plain = AutoModelForCausalLM.from_pretrained(tiny_run["llama"], dtype=torch.float32)
    learn_some_of(plain, table, rows)
    model = use_token_loss(copy.deepcopy(plain), chunk_tokens)
    figures = Validation(table, rows, script_forward, CPU, batches.BatchFormat(4, 2, None), metrics=top5).run(model)
    assert list(figures) == ["val_loss", "val_accuracy", "val_top5_accuracy", "val_rows_seen"]
    loss, accuracy = reference_figures(plain, table, rows)
    assert figures["val_loss"] == pytest.approx(loss, rel=1e-5)  # not the smoothed training loss
    assert figures["val_accuracy"] == pytest.approx(accuracy, abs=1e-6) and accuracy > 0.05
    assert accuracy <= figures["val_top5_accuracy"] <= 1
    assert model.training  # back to training mode


def test_validation_needs_a_forward_that_passes_its_token_loss_on(tiny_run, validation_split):
    from transformers import AutoModelForCausalLM

    table, rows = validation_split
    with pytest.raises(FinetuneError, match="forward\\(\\) must take a token_loss argument"):
        Validation(table, rows, lambda model, batch, num_items_in_batch: None, CPU, batches.BatchFormat(4, 2, None))

    def ignores_it(model, batch, num_items_in_batch, token_loss=None):
        return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    model = use_token_loss(AutoModelForCausalLM.from_pretrained(tiny_run["llama"]), None)
    with pytest.raises(FinetuneError, match="forward\\(\\) did not pass token_loss on to the model"):
        Validation(table, rows, ignores_it, CPU, batches.BatchFormat(4, 2, None)).run(model)

    def clashing(logits, targets, batch, positions):
        return {"accuracy": (1, 1)}
    with pytest.raises(FinetuneError, match="'accuracy' is built in"):
        Validation(table, rows, script_forward, CPU, batches.BatchFormat(4, 2, None), metrics=clashing).run(model)
