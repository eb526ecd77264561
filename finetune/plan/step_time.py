"""An estimated step time for each plan candidate: compute plus, under CPU offload, host-device traffic.

Memory decides what fits; among offloaded layouts that fit, time decides. Offload keeps the fp32 parameter shards
in host memory, so every micro-batch copies them to the device for its forward and again for its backward, and
copies its fp32 gradient shard back: 12 bytes per parameter and micro-batch over the host link, whatever the
micro-batch's size. For Llama 2 13B on one 80 GB GPU that is 156 GB, about 6 s a micro-batch on a PCIe 4 link, so
4 rows x 64 accumulation steps spend ~400 s a step on the link, while 32 rows x 8 with activation checkpointing
(a third more compute) spend ~50 s. The figures are estimates (a fixed share of the peak, a nominal link rate),
good for ranking layouts, printed as such.
"""
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.plan.memory import Candidate

ASSUMED_MFU = 0.4               # share of the device's peak a training step reaches
HOST_LINK_BYTES_PER_S = 25e9    # host <-> device per GPU: PCIe 4 x16 as measured, not its 32 GB/s nominal
DEFAULT_PEAK_FLOPS = 989e12     # H100/H200 dense bf16, for --plan-only where no device is at hand
OFFLOAD_BYTES_PER_PARAMETER = 4 + 4 + 4  # fp32 shard in for forward, in again for backward, fp32 gradient out


def step_seconds(parameters: int, world_size: int, micro_batch_size: int, accumulation_steps: int,
                 block_size: int, checkpointing: bool, cpu_offload: bool,
                 peak_flops: float = DEFAULT_PEAK_FLOPS, active_parameters: int | None = None
                 ) -> tuple[float, float]:
    """(compute seconds, host-device traffic seconds) of one optimiser step on each device. `active_parameters`:
    what a token computes with when that is fewer than all (a mixture of experts); traffic moves all of them."""
    tokens = micro_batch_size * accumulation_steps * block_size
    # 6 FLOPs per parameter and token (forward 2, backward 4); checkpointing runs the forward again (+2).
    computed = active_parameters or parameters
    compute = (8 if checkpointing else 6) * computed * tokens / (peak_flops * ASSUMED_MFU)
    traffic = 0.0
    if cpu_offload:
        traffic = accumulation_steps * OFFLOAD_BYTES_PER_PARAMETER * parameters / world_size / HOST_LINK_BYTES_PER_S
    return compute, traffic


def fastest(candidates: list["Candidate"], parameters: int, world_size: int, block_size: int,
            peak_flops: float = DEFAULT_PEAK_FLOPS, active_parameters: int | None = None) -> "Candidate | None":
    """The fitting candidate with the least estimated step time (None if none fits); ties keep the list's order."""
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda c: sum(step_seconds(parameters, world_size, c.micro_batch_size,
                                                       c.accumulation_steps, block_size, c.checkpointing,
                                                       c.cpu_offload, peak_flops, active_parameters)))
