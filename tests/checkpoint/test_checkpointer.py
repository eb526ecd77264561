"""finetune/checkpoint/checkpointer.py: a resumed run is compared on what it is, not only its flags; a difference is
one line, or with --resume-changed the run goes on under the new code with every trained weight restored."""
import pytest
import torch

from finetune.checkpoint import checkpointer, run_record
from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError
from finetune.training import warmup_cosine_schedule

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
CPU = Backend(engine="single", device=torch.device("cpu"))
FLAGS = {"seed": 0, "lr": 1e-3, "batch_size": 4, "max_grad_norm": 1.0}


# ---- flags: the data order always, the optimiser's flags unless --resume-changed ----------------------------------

def test_an_optimiser_flag_is_refused_naming_resume_changed_and_accepted_with_it():
    state = dict(FLAGS)
    with pytest.raises(FinetuneError, match=r"--lr 0.002 differs .*or add --resume-changed"):
        checkpointer.check_same_run("ck", state, dict(FLAGS, lr=2e-3))
    assert checkpointer.check_same_run("ck", state, dict(FLAGS, lr=2e-3), accept_changes=True) == [
        "--lr 0.002 now, 0.001 then"]


def test_a_data_order_flag_is_refused_even_with_resume_changed():
    with pytest.raises(FinetuneError, match=r"--seed 1 differs from the run being resumed") as raised:
        checkpointer.check_same_run("ck", dict(FLAGS), dict(FLAGS, seed=1), accept_changes=True)
    assert "--resume-changed" not in str(raised.value)


# ---- what the run is: the trained state, saved and compared --------------------------------------------------------

def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2))


def training_setup(freeze_layer_0=False):
    model = tiny_model()
    if freeze_layer_0:
        model.model.layers[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = warmup_cosine_schedule(optimizer, 10, 0.1, 0.1)
    return model, optimizer, scheduler, run_record.describe(model, optimizer, scheduler, 10)


@pytest.fixture
def trained_checkpoint(tmp_path):
    """A checkpoint of step 2 of a full fine-tuning run: every weight trained."""
    model, optimizer, scheduler, record = training_setup()
    for _ in range(2):
        model(input_ids=torch.arange(1, 9)[None], labels=torch.arange(1, 9)[None]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    path = checkpointer.save_checkpoint(str(tmp_path), 2, model, optimizer, scheduler, dict(FLAGS, what_ran=record),
                                        CPU, keep_last=2)
    return path, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_resume_that_froze_trained_weights_is_one_line_naming_them(trained_checkpoint):
    path, _ = trained_checkpoint
    model, optimizer, scheduler, record = training_setup(freeze_layer_0=True)
    with pytest.raises(FinetuneError) as raised:
        checkpointer.load_checkpoint(path, model, optimizer, scheduler, CPU, dict(FLAGS), record)
    assert str(raised.value).startswith("the trainable parameters: model.layers.0.self_attn.q_proj.weight and 8 "
                                        "more are frozen now and trained then (and 1 more difference)")
    assert "corrupt" not in str(raised.value)


def test_with_resume_changed_the_frozen_weights_are_the_trained_ones(trained_checkpoint):
    path, trained = trained_checkpoint
    model, optimizer, scheduler, record = training_setup(freeze_layer_0=True)
    state = checkpointer.load_checkpoint(path, model, optimizer, scheduler, CPU, dict(FLAGS), record,
                                         accept_changes=True)
    assert state["step"] == 2 and not state["optimizer_kept"] and len(state["changes"]) == 2
    for name, p in model.named_parameters():  # the frozen layer too, not the base weights it was loaded with
        assert torch.equal(p, trained[name]), name
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-2 * warmup_cosine_schedule(torch.optim.SGD([torch.zeros(1)], lr=1), 10, 0.1, 0.1).lr_lambdas[0](2))


def test_with_resume_changed_a_new_rate_keeps_the_optimiser_state_and_takes_the_new_rate(trained_checkpoint):
    path, trained = trained_checkpoint
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    scheduler = warmup_cosine_schedule(optimizer, 10, 0.1, 0.1)
    record = run_record.describe(model, optimizer, scheduler, 10)
    with pytest.raises(FinetuneError, match="parameter group 0's initial_lr: 0.005 now, 0.01 then"):
        checkpointer.load_checkpoint(path, model, optimizer, scheduler, CPU, dict(FLAGS), record)
    state = checkpointer.load_checkpoint(path, model, optimizer, scheduler, CPU, dict(FLAGS), record, True)
    assert state["optimizer_kept"]
    assert optimizer.state[next(model.parameters())]["exp_avg"].abs().sum() > 0  # the moments came back
    assert optimizer.param_groups[0]["initial_lr"] == 5e-3 and scheduler.base_lrs == [5e-3]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * scheduler.lr_lambdas[0](2))


def test_the_same_run_resumes_exactly(trained_checkpoint):
    path, trained = trained_checkpoint
    model, optimizer, scheduler, record = training_setup()
    state = checkpointer.load_checkpoint(path, model, optimizer, scheduler, CPU, dict(FLAGS), record)
    assert state["changes"] == [] and state["optimizer_kept"]
    assert all(torch.equal(p, trained[name]) for name, p in model.named_parameters())
    assert scheduler.last_epoch == 2


def test_a_checkpoint_without_the_record_says_start_over(trained_checkpoint):
    import json
    import os

    path, _ = trained_checkpoint
    state_file = os.path.join(path, "trainer_state.json")
    with open(state_file) as f:
        state = json.load(f)
    del state["what_ran"]
    with open(state_file, "w") as f:
        json.dump(state, f)
    model, optimizer, scheduler, record = training_setup()
    with pytest.raises(FinetuneError, match="was not written by this version .* --overwrite"):
        checkpointer.load_checkpoint(path, model, optimizer, scheduler, CPU, dict(FLAGS), record)
