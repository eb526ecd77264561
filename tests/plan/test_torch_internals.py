"""finetune/plan/torch_internals.py: PyTorch's private tracker members, and the recording trackers."""
import numpy as np
import torch

from finetune.plan import torch_internals
from finetune.plan.torch_internals import BACKWARD, FORWARD, OPTIMIZER


def test_the_private_tracker_members_the_simulation_uses_are_all_there():
    """A PyTorch upgrade that moves what finetune/plan/torch_internals.py subclasses or reads fails here, by name."""
    missing = torch_internals.missing_private_members()
    assert not missing, (f"torch {torch.__version__} moved or renamed: {', '.join(missing)} "
                         f"(finetune/plan/torch_internals.py)")


def test_the_private_member_check_names_what_moved(monkeypatch):
    from torch.distributed._tools.mem_tracker import MemTracker

    monkeypatch.delattr(MemTracker, "_update_peak_stats")
    monkeypatch.setitem(torch_internals.TRACKER_METHODS, "_track_module_params_and_buffers", ("module", "renamed"))
    assert torch_internals.missing_private_members() == [
        "MemTracker._track_module_params_and_buffers(module, renamed)", "MemTracker._update_peak_stats"]


def test_the_recording_trackers_are_pytorchs_own():
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    single, sharded = torch_internals.recording_trackers()
    assert issubclass(single, MemTracker) and issubclass(sharded, FSDPMemTracker)


def tracked_step(model):
    """One AdamW step of `model` (two linear layers) after an untracked one, under the single-device tracker."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
    x = torch.randn(3, 8)
    model(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker = torch_internals.recording_trackers()[0]()
    tracker.track_external(model, optimizer)
    tracker.start_timeline({"0": 0, "1": 1})  # module paths under the root: the two layers
    with tracker:
        tracker.enter_phase(FORWARD)
        loss = model(x).sum()
        tracker.enter_phase(BACKWARD)
        loss.backward()
        tracker.enter_phase(OPTIMIZER)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rows = np.asarray(tracker.timeline)
    return {name: rows[:, i] for i, name in enumerate(tracker.category_names())}, tracker.labels


def two_layers():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


def test_each_op_records_the_bytes_of_each_category():
    model = two_layers()
    weights = sum(p.numel() for p in model.parameters()) * 4  # fp32
    columns, labels = tracked_step(model)
    assert len(labels) == len(columns["Parameter"]) > 10
    assert (columns["Parameter"] == weights).all()
    # AdamW's two moments of every weight and a step count per tensor, there from the untracked step on.
    assert columns["Optstate"][0] == 2 * weights + 4 * len(list(model.parameters()))
    assert columns["Gradient"].max() == weights and columns["Gradient"][-1] == 0  # set to None at the end
    assert columns["Activation"].max() > 0


def test_rows_are_labelled_with_the_phase_and_the_layer_position():
    _, labels = tracked_step(two_layers())
    phases = [phase for phase, _ in labels]
    assert phases == sorted(phases) and set(phases) == {0, 1, 2}  # forward, backward, optimizer
    positions = {phase: [position for p, position in labels if p == phase] for phase in (0, 1, 2)}
    assert sorted(set(positions[0])) == [0, 1] and positions[0] == sorted(positions[0])  # layers in order
    assert set(positions[1]) <= {-1, 0, 1} and 1 in positions[1]  # backward enters both layers, last first
    assert set(positions[2]) == {-1}  # the optimizer step is outside the layers


def test_frozen_parameters_are_tracked_without_gradient_hooks():
    """PyTorch's tracker hooks every parameter's gradient, which fails on frozen ones (a LoRA base)."""
    model = two_layers()
    model[0].requires_grad_(False)
    columns, _ = tracked_step(model)
    trainable = sum(p.numel() for p in model[1].parameters()) * 4
    assert columns["Gradient"].max() == trainable
    assert (columns["Parameter"] == sum(p.numel() for p in model.parameters()) * 4).all()

