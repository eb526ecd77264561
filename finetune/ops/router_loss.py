"""The router's load-balancing loss of a mixture-of-experts model (Mixtral, Qwen3-MoE, gpt-oss), on packed rows.

A model whose config asks for it (`output_router_logits` true and `router_aux_loss_coef` above 0) adds
`router_aux_loss_coef x aux` to its loss, where `aux` is the load-balancing loss its own module defines
(`load_balancing_loss_func`: the share of tokens sent to each expert times the mean router probability of that
expert, over the tokens of one forward call). The model's own forward takes those tokens from `attention_mask`,
so on a packed row it would count the padding tail. Here the same function gets the real tokens only (every
position in an example span), so a packed micro-batch's aux loss is the model's own aux loss over the same
examples as a padded batch.

Weighting: the loss of each micro-batch is divided by the target tokens of the whole optimiser step (all
micro-batches, all ranks); its aux loss is weighted by the micro-batch's share of those targets, the same weight
its cross-entropy carries, so the step's aux loss is a weighted mean over its micro-batches and ranks, not a sum
that grows with accumulation. Each training call's weighted aux loss is kept (detached) for the log:
`metrics.jsonl` has `aux_loss` beside the token loss.
"""
import sys
from collections.abc import Callable

import torch

from finetune.errors import FinetuneError
from finetune.ops.example_spans import layout_of


class RouterAuxLoss:
    """The load-balancing loss of a model whose config asks for it, and the weighted sum of this step's values."""

    def __init__(self, coefficient: float, num_experts: int, top_k: int, loss_function: Callable) -> None:
        self.coefficient, self.num_experts, self.top_k = coefficient, num_experts, top_k
        self.loss_function = loss_function
        self.step_sum: torch.Tensor | None = None

    def __call__(self, router_logits: tuple[torch.Tensor, ...], example_spans: object, rows: int,
                 length: int) -> torch.Tensor:
        """The model's aux loss over the real tokens of a (rows, length) micro-batch: positions in a span."""
        device = router_logits[0].device
        real = (layout_of(example_spans, rows, length, device).example_ids >= 0).to(torch.float32)
        return self.loss_function(router_logits, self.num_experts, self.top_k, real)

    def keep(self, weighted: torch.Tensor) -> None:
        """Add one training call's weighted aux loss to the step's sum (no host sync)."""
        value = weighted.detach().float()
        self.step_sum = value if self.step_sum is None else self.step_sum + value

    def take(self) -> torch.Tensor | None:
        """This rank's weighted aux loss since the last take (the finished step's), and start again."""
        value, self.step_sum = self.step_sum, None
        return value


def router_aux_loss(model: torch.nn.Module) -> RouterAuxLoss | None:
    """The aux loss `model`'s config asks for, with the function the model's own module defines; None when it asks
    for none (a dense model, or `output_router_logits` off, or a coefficient of 0)."""
    config = model.config
    coefficient = float(getattr(config, "router_aux_loss_coef", 0) or 0)
    if not getattr(config, "output_router_logits", False) or coefficient <= 0:
        return None
    # From the model class's own module (FSDP2 puts a class of its own in front of it: look along the MRO).
    modules = (sys.modules.get(cls.__module__) for cls in type(model).__mro__)
    loss_function = next((module.load_balancing_loss_func for module in modules
                          if hasattr(module, "load_balancing_loss_func")), None)
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if loss_function is None or not num_experts or not top_k:
        raise FinetuneError(f"{type(model).__name__}'s config asks for the router's aux loss (output_router_logits) "
                            f"but its module defines no load_balancing_loss_func with num_experts and "
                            f"num_experts_per_tok; set output_router_logits to false in config.json")
    return RouterAuxLoss(coefficient, int(num_experts), int(top_k), loss_function)


def find_router_aux(model: torch.nn.Module) -> RouterAuxLoss | None:
    """The aux loss the model's training loss adds (the model's, or under a peft wrapper its base model's)."""
    return next((module.router_aux for module in model.modules()
                 if isinstance(getattr(module, "router_aux", None), RouterAuxLoss)), None)
