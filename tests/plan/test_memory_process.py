"""finetune/plan/memory_process.py: the simulation child answers one JSON line per job."""
import io
import json

import pytest

from finetune.plan.memory_process import SimulationChild, child_main

TINY = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
PARAMETERS = 2 * 128 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
SETUP = {"engine": "single", "world_size": 1, "block_size": 16, "checkpointing": False, "precision": "fp32",
         "adapter": "none", "lora": {}, "chunked_loss": False}


def test_the_child_answers_each_job_with_one_line_in_order():
    jobs = [{"config": TINY, "setup": dict(SETUP, block_size=128), "runs": [[1, 1]], "stop": None},
            {"config": TINY, "setup": SETUP, "runs": [[2, 1]], "stop": None}]
    out = io.StringIO()
    child_main([json.dumps(job) + "\n" for job in jobs], out)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first == {"error": "block size 128 exceeds the model's max_position_embeddings 64"}
    assert list(second) == ["readings"] and list(second["readings"]) == ["2"]  # micro-batch sizes as JSON keys
    reading = second["readings"]["2"]["on_device"]
    assert reading["device_peak"] == sum(reading["categories"].values()) > 0
    assert reading["categories"]["Parameter"] == 4 * PARAMETERS  # the tiny model's fp32 weights


@pytest.mark.slow
def test_simulation_child_keeps_one_process_and_reports_its_death():
    with SimulationChild() as child:
        with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
            child.simulate(TINY, {"setup": dict(SETUP, block_size=128), "runs": [[1, 1]], "stop": None})
        process = child.process
        readings = child.simulate(TINY, {"setup": SETUP, "runs": [[1, 1], [2, 1]], "stop": None})
        assert child.process is process  # the same child answered both jobs
        assert sorted(readings) == [1, 2] and readings[2]["on_device"]["device_peak"] > 0
        # A config the child cannot even read (no layers) kills it: the error names the child's last line.
        with pytest.raises(RuntimeError, match=r"^memory simulation failed: KeyError: 'num_hidden_layers'$"):
            child.simulate({"hidden_size": 8}, {"setup": SETUP, "runs": [[1, 1]], "stop": None})
        assert child.process is None and process.poll() is not None
    assert process.stdin.closed
