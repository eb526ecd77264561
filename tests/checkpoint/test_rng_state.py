"""finetune/checkpoint/rng_state.py: each rank saves and restores its own current device's RNG."""
import json

import torch

# ---- each rank saves and restores its own device's RNG ---------------------------------------------------

class FakeCudaRng:
    """torch.cuda's RNG calls for a process bound to device `current` of a node with several GPUs."""

    def __init__(self, current):
        self.current, self.set_calls = current, []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([self.current, 7],
                                                                                             dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.set_calls.append(
            state.tolist()))

        def every_device(*args):
            raise AssertionError("the states of every visible device were asked for")
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_device)


def test_rng_state_holds_the_current_device_only(monkeypatch):
    from finetune.checkpoint import rng_state

    fake = FakeCudaRng(current=5)  # local rank 5 of an 8-GPU node
    fake.install(monkeypatch)
    state = json.loads(json.dumps(rng_state.rng_state()))
    assert state["cuda"] == [bytes([5, 7]).hex()]
    # Resumed on a 2-GPU node as local rank 1: its state is restored, no IndexError.
    fake.current = 1
    rng_state.set_rng_state(state)
    assert fake.set_calls == [[5, 7]]
