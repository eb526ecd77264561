"""finetune/plan/memory_step.py: a tiny simulated step's peaks, the stop rule and the depth carry-over."""
import numpy as np
import pytest
import torch

from finetune.plan import memory_step

TINY = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
SETUP = {"engine": "single", "world_size": 1, "block_size": 16, "checkpointing": False, "precision": "fp32",
         "adapter": "none", "lora": {}, "chunked_loss": False}
# The tiny model's parameters: two embeddings, per layer q, o (32 x 32), k, v (32 x 16), the MLP and two norms,
# and the final norm.
PARAMETERS = 2 * 128 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
TENSORS = 2 + 2 * 9 + 1


@pytest.fixture(scope="module")
def readings():
    return memory_step.simulate_readings(TINY, SETUP, [(4, 1), (1, 1)])


def test_a_tiny_simulated_step_has_positive_peaks_that_add_up(readings):
    assert sorted(readings) == [1, 4]  # smallest first, every run read
    for reading in readings.values():
        on_device = reading["on_device"]
        assert on_device["device_peak"] > 0 and on_device["host_peak"] == 0
        assert sum(on_device["categories"].values()) == on_device["device_peak"]
        # Without FSDP nothing is offloaded: the offloaded reading is the same step.
        assert reading["offloaded"]["device_peak"] == on_device["device_peak"]


def test_the_peak_holds_the_fp32_weights_and_adamw_state(readings):
    categories = readings[4]["on_device"]["categories"]
    assert categories["Parameter"] == 4 * PARAMETERS
    assert categories["Optstate"] >= 8 * PARAMETERS + 4 * TENSORS  # two fp32 moments and a step per tensor
    assert readings[4]["on_device"]["device_peak"] >= 12 * PARAMETERS


def test_a_larger_micro_batch_needs_more_memory(readings):
    assert readings[4]["on_device"]["device_peak"] > readings[1]["on_device"]["device_peak"]


def test_a_block_longer_than_the_model_allows_is_refused():
    with pytest.raises(ValueError, match="block size 128 exceeds the model's max_position_embeddings 64"):
        memory_step.build_model(TINY, dict(SETUP, block_size=128))


def test_the_training_batch_is_shaped_like_the_scripts_micro_batch():
    batch = memory_step.training_batch(vocab_size=50, micro_batch_size=3, block_size=7)
    assert batch["input_ids"].shape == (3, 7) and int(batch["input_ids"].max()) < 50
    assert (batch["labels"][:, 0] == -100).all() and torch.equal(batch["labels"][:, 1:], batch["input_ids"][:, 1:])
    assert batch["position_ids"].tolist() == [list(range(7))] * 3
    assert batch["num_items_in_batch"] == 3 * 6


def test_the_4bit_stand_in_holds_half_a_byte_per_weight_plus_scales():
    layer = memory_step.FourBitLinearStandIn(128, 64, torch.bfloat16)
    assert layer.packed.numel() * 2 == 128 * 64 * 0.5 + 128 * 64 / 64 * 4  # NF4 weights and an fp32 scale per 64
    assert not layer.packed.requires_grad


NAMES = ["Parameter", "Sharded Param", "Activation", "OptState"]  # two of them go to the host with offload


def test_readings_take_the_peak_row_with_and_without_offload():
    segments = {(0, -1): np.array([[10, 0, 5, 0]]), (1, 0): np.array([[10, 20, 1, 30], [10, 20, 40, 0]])}
    reading = memory_step.readings_from_segments(segments, NAMES)
    # Totals 15, 61, 70: all on the device, the peak is the last row.
    assert reading["on_device"] == {"device_peak": 70, "host_peak": 0,
                                    "categories": {"Parameter": 10, "Sharded Param": 20, "Activation": 40}}
    # Offloaded, the device holds 15, 11, 50 and the host 0, 50, 20.
    assert reading["offloaded"] == {"device_peak": 50, "host_peak": 50,
                                    "categories": {"Parameter": 10, "Activation": 40}}


def test_the_stop_rule_asks_whether_any_offload_setting_still_fits():
    reading = {"on_device": {"device_peak": 150, "host_peak": 0},
               "offloaded": {"device_peak": 60, "host_peak": 90}}
    assert not memory_step.exceeds(reading, None)
    assert memory_step.exceeds(reading, {"offloads": [False], "device": 100, "host": 1000})
    assert not memory_step.exceeds(reading, {"offloads": [False, True], "device": 100, "host": 100})
    assert memory_step.exceeds(reading, {"offloads": [False, True], "device": 100, "host": 80})


def test_split_segments_groups_the_rows_of_each_phase_and_layer():
    segments = memory_step.split_segments([[1, 0], [2, 0], [3, 1], [4, 1]], [(0, -1), (0, 0), (0, 0), (1, -1)])
    assert list(segments) == [(0, -1), (0, 0), (1, -1)]
    assert segments[(0, 0)].tolist() == [[2, 0], [3, 1]]


def affine_segments(depth):
    """Segments of a `depth`-layer step whose bytes are affine in the depth and in the layer's position, op by op."""
    def rows(position):
        ops = np.arange(1, 4)[:, None] * np.array([[1, 2]])  # three ops, two categories
        return 100 * ops + 7 * depth + 3 * max(position, 0) * ops
    return {(phase, position): rows(position) for phase in (0, 1) for position in range(-1, depth)}


def test_the_carry_over_from_3_and_4_layers_is_exact_for_identical_layers():
    three, four, six = affine_segments(3), affine_segments(4), affine_segments(6)
    carried = memory_step.deeper_segments(three, four, 6, ["Activation", "Parameter"])
    assert sorted(carried) == [(phase, position) for phase in (0, 1) for position in (-1, 0, 1, 4, 5)]
    for key, rows in carried.items():
        assert rows.tolist() == six[key].tolist(), key


def test_a_carry_over_that_goes_negative_is_refused():
    three, four = affine_segments(3), affine_segments(4)
    four = {key: rows - 100 for key, rows in four.items()}  # shrinking with depth: these layers are not alike
    with pytest.raises(RuntimeError, match="negative sizes"):
        memory_step.deeper_segments(three, four, 40, ["Activation", "Parameter"])
