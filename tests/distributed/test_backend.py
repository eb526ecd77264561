"""finetune/distributed/backend.py: the process group has a CPU backend beside NCCL, and the other ranks wait for rank 0's
download behind a long-timeout barrier (torchrun on gloo reproduces both mechanisms on a CPU)."""
import pytest
import textwrap

from conftest import REPO_ROOT, torchrun


def _worker(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n" + textwrap.dedent(body))
    return path


# ---- the default group has a CPU backend beside NCCL -----------------------------------------------------

OFFLOAD_CLIP = """
    import torch, torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from finetune.distributed.backend import process_group_backend
    from finetune.distributed.sharding import shard_model
    from finetune.training import clip_grad_norm
    # NCCL needs GPUs: gloo stands in for it as the "cuda" backend, which CPU tensors never reach.
    backend = process_group_backend(True).replace("nccl", "gloo") if sys.argv[1] == "ours" else sys.argv[1]
    dist.init_process_group(backend)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2))
    shard_model(model, cpu_offload=True)
    ids = torch.randint(64, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    sys.stdout.write(f"norm={float(clip_grad_norm(model, 1.0))}\\n")  # one write: the ranks' lines do not interleave
    sys.stdout.flush()
    dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_offloaded_gradients_clip_with_the_process_group_backends(tmp_path):
    worker = _worker(tmp_path, "clip.py", OFFLOAD_CLIP)
    ours = torchrun(2, worker, "ours", timeout=180)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert ours.stdout.count("norm=") == 2
    # The mechanism of the crash: a group whose only backend serves the accelerator cannot reduce host tensors
    # (here the CPU mesh fails already in the forward; on GPUs the shards travel on the device and the clip fails).
    accelerator_only = torchrun(2, worker, "cuda:gloo", timeout=180)
    assert accelerator_only.returncode != 0
    assert "No backend type associated with device type cpu" in accelerator_only.stderr


# ---- the others wait for rank 0's download behind a long-timeout barrier ----------------------------------

SLOW_DOWNLOAD = """
    import time
    from transformers import AutoModelForCausalLM
    from finetune.config import ModelConfig
    from finetune.distributed.backend import Backend, enable_advanced_parallelization
    from finetune.model.loading import load_model

    class SlowDownload(AutoModelForCausalLM):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            time.sleep(8)  # rank 0 fetching the weights: longer than the group's timeout
            return AutoModelForCausalLM.from_pretrained(*args, **kwargs)

    if sys.argv[2] == "no-barrier":
        Backend.wait_for_download = lambda self: None
    backend = enable_advanced_parallelization("no", timeout_minutes=0.05)  # 3 s
    model = load_model(backend, SlowDownload, ModelConfig(sys.argv[1]))
    sys.stdout.write(f"loaded {sum(p.to_local().sum().item() for p in model.parameters())}\\n")
    sys.stdout.flush()
    backend.shutdown()
"""


@pytest.mark.distributed
def test_ranks_wait_for_the_download_past_the_group_timeout(tiny_run, tmp_path):
    worker = _worker(tmp_path, "download.py", SLOW_DOWNLOAD)
    waited = torchrun(2, worker, tiny_run["llama"], "barrier", timeout=180)
    assert waited.returncode == 0, waited.stderr[-3000:]
    assert waited.stdout.count("loaded") == 2
    unguarded = torchrun(2, worker, tiny_run["llama"], "no-barrier", timeout=180)
    assert unguarded.returncode != 0  # the first collective timed out while rank 0 was still downloading
