"""Causal-LM loss computed a chunk of tokens at a time, so the full logits tensor never exists, with a per-token
loss the training script writes.

The plain path turns the hidden states of a whole micro-batch into logits (tokens x vocab, then an fp32 copy for
the cross-entropy and an fp32 gradient of the same size). For Baichuan2's 125,696-token vocabulary and 4 rows of
1024 tokens that is about 2 GiB per copy. Here the head and the loss run over `chunk_tokens` tokens at a time;
backward recomputes each chunk's logits instead of keeping them.

    loss = chunked_causal_lm_loss(hidden_states, head_weight, labels, num_items_in_batch, token_loss=...)

    use_token_loss(model, chunk_tokens)  # afterwards model(input_ids=..., labels=..., token_loss=...) computes
                                         # its loss this way (chunk_tokens None: whole micro-batch logits)

A token loss is `token_loss(logits, targets, positions=...)`: fp32 logits (tokens x vocab) of one chunk, their
next-token targets (-100 where no loss is taken) and `positions`, the slice of the micro-batch's flattened tokens
the chunk covers; it returns one loss per token. Positions without a target are left out of the sum whatever it
returns there. The training scripts' `token_loss` is where a user edits the loss.

`use_token_loss` keeps the call inside the model's own forward, which is where FSDP2 gathers the root module's
parameters (embeddings, final norm and the output head); calling the decoder and the head separately from outside
would use the sharded head.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F

from finetune.errors import FinetuneError
from finetune.ops.router_loss import router_aux_loss

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024  # fp32 logits of one chunk: 1024 x 125,696 x 4 B = 0.5 GiB for Baichuan2
TokenLoss = Callable[..., torch.Tensor]


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t is scored against labels[t + 1]; the last position has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def capped_logits(logits: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """fp32 logits, soft-capped as softcap * tanh(logits / softcap) when the model does (Gemma 2's
    final_logit_softcapping)."""
    logits = logits.float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, positions: slice | None = None) -> torch.Tensor:
    """The built-in token loss: next-token cross-entropy of each token (0 where there is no target)."""
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def summed_token_loss(token_loss: TokenLoss, logits: torch.Tensor, targets: torch.Tensor,
                      positions: slice) -> torch.Tensor:
    """Sum of `token_loss` over the positions that have a target; a result of the wrong shape is one line."""
    losses = token_loss(logits, targets, positions=positions)
    if not isinstance(losses, torch.Tensor) or losses.shape != targets.shape:
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise FinetuneError(f"token_loss must return one loss per token of its chunk, shape ({targets.shape[0]},); "
                            f"it returned {got}")
    # masked_fill, not a multiply: a NaN or infinity where no target is taken must not reach the sum
    return losses.float().masked_fill(targets == IGNORE_INDEX, 0.0).sum()


class _ChunkedTokenLoss(torch.autograd.Function):
    """Sum of `token_loss` of (hidden @ weight.T) against targets, one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_tokens, softcap, token_loss):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            positions = slice(start, start + chunk_tokens)
            logits = capped_logits(hidden[positions] @ weight.t(), softcap)
            total += summed_token_loss(token_loss, logits, targets[positions], positions)
        ctx.save_for_backward(hidden, weight, targets, *([scale] if torch.is_tensor(scale) else []))
        ctx.chunk_tokens, ctx.softcap, ctx.token_loss = chunk_tokens, softcap, token_loss
        ctx.scale = None if torch.is_tensor(scale) else scale
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, targets, *saved_scale = ctx.saved_tensors
        scale = saved_scale[0] if saved_scale else ctx.scale
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # Summed over the chunks in fp32 and rounded to the weight's dtype once at the end: a bf16 running
            # sum would round at every chunk (one per 1,024 tokens) and lose the small contributions.
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        factor = grad_output * scale
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            positions = slice(start, start + ctx.chunk_tokens)
            rows = hidden[positions]
            # The chunk's logits again, and d(sum of token losses)/d(logits) by autograd through the token loss
            # alone: whatever the script's token_loss computes, its gradient is exact.
            raw = (rows @ weight.t()).float().requires_grad_()
            with torch.enable_grad():
                chunk_sum = summed_token_loss(ctx.token_loss, capped_logits(raw, ctx.softcap), targets[positions],
                                              positions)
            (grad_logits,) = torch.autograd.grad(chunk_sum, raw)
            grad_logits = (grad_logits * factor).to(hidden.dtype)
            if grad_hidden is not None:
                torch.matmul(grad_logits, weight, out=grad_hidden[positions])
            if grad_weight is not None:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), rows)
                else:
                    grad_weight += torch.matmul(grad_logits.t(), rows).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _scale(num_items_in_batch, targets, device):
    """1 / the count the summed token losses are divided by."""
    if num_items_in_batch is None:
        return 1.0 / (targets != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
    if torch.is_tensor(num_items_in_batch):
        return 1.0 / num_items_in_batch.to(device, torch.float32)
    return 1.0 / float(num_items_in_batch)  # a host int: no tensor made from it, so no host-to-device copy and sync


def chunked_causal_lm_loss(hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch: int | torch.Tensor | None = None,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS, softcap: float | None = None,
                           token_loss: TokenLoss | None = None) -> torch.Tensor:
    """Next-token loss of `hidden_states @ head_weight.T`, computed `chunk_tokens` tokens at a time.

    hidden_states: (batch, length, hidden) after the final norm; head_weight: (vocab, hidden), already
    row-normalised for Baichuan's NormHead; labels: (batch, length), -100 where no loss is taken. Position t
    predicts labels[t + 1]. `token_loss` gives each token's loss (default: cross-entropy). The summed token
    losses are divided by `num_items_in_batch` (the target count of the whole global batch) when given,
    otherwise by this batch's own target count. `softcap`: the model's final_logit_softcapping, applied to the
    logits first. Under autocast the head runs in the autocast dtype and the loss in fp32, as in the models' own
    forward.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    targets = shifted_targets(labels.to(hidden_states.device)).reshape(-1)
    scale = _scale(num_items_in_batch, targets, hidden_states.device)
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_states, head_weight = hidden_states.to(dtype), head_weight.to(dtype)
    elif head_weight.dtype != hidden_states.dtype:
        head_weight = head_weight.to(hidden_states.dtype)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    with torch.autocast(device_type, enabled=False):
        return _ChunkedTokenLoss.apply(hidden, head_weight, targets, scale, chunk_tokens, softcap,
                                       token_loss or cross_entropy)


def whole_logits_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
                      token_loss: TokenLoss | None = None) -> torch.Tensor:
    """The same loss from logits the model already made for the whole micro-batch (--chunked-loss off)."""
    targets = shifted_targets(labels.to(logits.device)).reshape(-1)
    with torch.autocast(logits.device.type, enabled=False):
        flat = logits.float().reshape(-1, logits.shape[-1])
        total = summed_token_loss(token_loss or cross_entropy, flat, targets, slice(0, targets.shape[0]))
    return total * _scale(num_items_in_batch, targets, logits.device)


def _head_weight(model):
    """The output head's weight as the forward uses it (Baichuan's NormHead normalises its rows)."""
    if hasattr(model, "head_weight"):
        return model.head_weight()
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("use_chunked_loss supports output heads without a bias")
    return head.weight


class ChunkedLossOutput:
    """What a model under the chunked loss returns: `loss`, and no logits (they never exist whole)."""

    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss

    @property
    def logits(self) -> torch.Tensor:
        raise FinetuneError("outputs.logits: the chunked loss is on (--chunked-loss on, the GPU default), so whole "
                            "logits are never made; change the loss in token_loss() beside forward() in the "
                            "script (it sees each chunk's logits), or run with --chunked-loss off")

    def __getitem__(self, key: str | int) -> torch.Tensor:
        return self.loss if key in ("loss", 0) else self.logits


def use_token_loss(model: torch.nn.Module, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> torch.nn.Module:
    """Make `model(..., labels=..., token_loss=...)` compute its loss with a per-token loss (default
    cross-entropy), `chunk_tokens` tokens at a time; returns the model.

    With `chunk_tokens`, the output has `loss` and no `logits` (reading them is one error line), and a training
    call without labels is refused: it would make the whole logits the chunked loss exists to avoid. With None the
    model's own forward makes the whole micro-batch's logits (every model-specific head transform applied) and
    the loss is taken from them; the output has both. Calls without labels (generation, logits) keep the model's
    own forward. Parameters and state-dict names are unchanged, so checkpoints and FSDP2 sharding are unaffected;
    apply it before or after `fully_shard`. `model` is a ...ForCausalLM with a `.model` decoder (Llama,
    Baichuan); a peft wrapper reaches it through its own forward, so patch the wrapped model.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if getattr(model.config, "z_loss_weight", 0):  # Baichuan's config may add one inside the model's own loss
        raise ValueError("the model's config adds a z-loss (z_loss_weight > 0), which the script's token_loss would "
                         "leave out; set z_loss_weight to 0 and add the z-loss in token_loss (its commented example)")
    if chunk_tokens is not None:
        for name in ("logit_scale", "logits_scaling"):  # Cohere, Granite: the head's logits are rescaled
            if getattr(model.config, name, 1) not in (None, 1):
                raise ValueError(f"the chunked loss does not apply {name}; keep it off (--chunked-loss off)")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    decoder = model.get_decoder()
    plain_forward = model.forward
    # A mixture-of-experts config may ask for the router's load-balancing loss: added here over real tokens only
    # (finetune/ops/router_loss.py), weighted like the micro-batch's cross-entropy.
    model.router_aux = router_aux = router_aux_loss(model)

    def with_router_aux(loss, outputs, labels, num_items_in_batch, example_spans):
        rows, length = labels.shape
        share = 1.0  # this call's share of the step's targets (all of them when no step total is given)
        if num_items_in_batch is not None:
            targets = (shifted_targets(labels.to(loss.device)) != IGNORE_INDEX).sum()
            share = targets * _scale(num_items_in_batch, None, loss.device)
        weighted = router_aux(outputs.router_logits, example_spans, rows, length).to(loss.device) * share
        if model.training and torch.is_grad_enabled():  # training calls only: not validation, not the probe's
            router_aux.keep(weighted)
        return loss + router_aux.coefficient * weighted

    def forward(input_ids=None, labels=None, num_items_in_batch=None, token_loss=None, logits_to_keep=0, **kwargs):
        if labels is None:
            if chunk_tokens is not None and model.training and torch.is_grad_enabled():
                raise FinetuneError("the model was called for training without labels=, while the chunked loss is "
                                    "on (--chunked-loss on, the GPU default): it computes the loss from labels= "
                                    "chunk by chunk; keep labels= and edit token_loss() in the script, or run with "
                                    "--chunked-loss off to compute a loss from outputs.logits")
            return plain_forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        if router_aux is not None:
            kwargs["output_router_logits"] = True
        if chunk_tokens is None:
            outputs = plain_forward(input_ids=input_ids, **kwargs)
            loss = whole_logits_loss(outputs.logits, labels, num_items_in_batch, token_loss)
        else:
            outputs = decoder(input_ids=input_ids, **kwargs)
            loss = chunked_causal_lm_loss(outputs.last_hidden_state, _head_weight(model), labels,
                                          num_items_in_batch, chunk_tokens, softcap, token_loss)
        if router_aux is not None:
            loss = with_router_aux(loss, outputs, labels, num_items_in_batch, kwargs.get("example_spans"))
        if chunk_tokens is None:
            return CausalLMOutputWithPast(loss=loss, logits=outputs.logits)  # training runs without a cache
        return ChunkedLossOutput(loss)

    model.forward = forward
    model.token_loss_chunk = chunk_tokens  # what describe_parallel_plan reports
    return model


def use_chunked_loss(model: torch.nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.nn.Module:
    """`use_token_loss` with chunks: the loss `chunk_tokens` tokens at a time, full logits never made."""
    return use_token_loss(model, chunk_tokens)


def loss_description(chunk_tokens: int | None) -> str:
    """The plan's line on which loss runs: the token_loss the script's forward passes (cross-entropy if none)."""
    if chunk_tokens is None:
        return "token_loss from the whole micro-batch's logits (--chunked-loss off)"
    return f"token_loss {chunk_tokens} tokens at a time (--chunked-loss on): no whole logits, outputs.logits refused"
