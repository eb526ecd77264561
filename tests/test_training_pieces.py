"""finetune/training.py (test_training.py is taken by integration/): schedule, clipping, guard, validation."""
import math
import random

import numpy as np
import pytest
import torch

from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError
from finetune.training import NonFiniteGuard, clip_grad_norm, set_seed, warmup_cosine_schedule

CPU = Backend(engine="single", device=torch.device("cpu"))


def learning_rates(total_steps, warmup_ratio, min_lr_ratio, peak=2.0, steps=None):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = warmup_cosine_schedule(optimizer, total_steps, warmup_ratio, min_lr_ratio)
    rates = []
    for _ in range(steps or total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    rates = learning_rates(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1, peak=2.0, steps=130)
    # Warmup over int(100 * 0.1) = 10 steps: step s runs at (s + 1) / 10 of the peak, the peak itself at step 9.
    assert rates[:10] == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])
    # Then cosine from the peak (step 10) to 0.1 of it (step 100), half-way (step 55) at the mean of the two.
    assert rates[10] == pytest.approx(2.0)
    assert rates[55] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert rates[32] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 22 / 90))))
    assert all(a >= b for a, b in zip(rates[10:100], rates[11:101]))
    # Past the last step it stays at the floor rather than rising again.
    assert rates[100:] == pytest.approx([0.2] * 30)


def test_schedule_without_warmup_starts_at_the_peak():
    rates = learning_rates(total_steps=10, warmup_ratio=0.0, min_lr_ratio=0.0, peak=1.0)
    assert rates[0] == pytest.approx(1.0)  # one warmup step at least: (0 + 1) / 1
    assert rates[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 9)))


def test_clip_grad_norm_returns_the_norm_before_clipping_and_clips_to_max_norm():
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    norm = clip_grad_norm(model, 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(model.weight.grad, torch.tensor([[0.6, 0.8]]), atol=1e-6)
    model.weight.grad = torch.tensor([[0.3, 0.4]])  # under the limit: left as it is
    assert clip_grad_norm(model, 1.0).item() == pytest.approx(0.5)
    assert torch.allclose(model.weight.grad, torch.tensor([[0.3, 0.4]]))


def test_the_guard_skips_non_finite_updates_then_stops_naming_the_last_checkpoint(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000008").mkdir()
    guard = NonFiniteGuard(allowed=2, save_dir=str(tmp_path), backend=CPU)
    finite = torch.tensor(1.5)
    assert guard.update_is_finite(finite, torch.tensor(0.3), step=1) is True
    assert guard.update_is_finite(torch.tensor(float("nan")), finite, step=2) is False
    assert guard.update_is_finite(finite, torch.tensor(float("inf")), step=3) is False
    assert guard.skipped == 2
    assert "skipped the update of step 3" in capsys.readouterr().out
    assert guard.update_is_finite(finite, finite, step=4) is True  # finite steps do not reset the count
    with pytest.raises(FinetuneError) as raised:
        guard.update_is_finite(torch.tensor(float("-inf")), finite, step=9)
    assert str(raised.value) == (f"non-finite loss or gradient norm at step 9; the last good checkpoint is "
                                 f"{tmp_path / 'checkpoints' / 'step-00000008'}")


def test_the_guard_allowing_no_skip_stops_at_once_without_a_checkpoint(tmp_path):
    guard = NonFiniteGuard(allowed=0, save_dir=str(tmp_path), backend=CPU)
    with pytest.raises(FinetuneError, match=r"^non-finite loss or gradient norm at step 1$"):
        guard.update_is_finite(torch.tensor(float("nan")), torch.tensor(1.0), step=1)


def test_set_seed_repeats_python_numpy_and_torch_draws():
    def draws():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    set_seed(11)
    first = draws()
    set_seed(11)
    assert draws() == first
    set_seed(12)
    assert draws() != first
