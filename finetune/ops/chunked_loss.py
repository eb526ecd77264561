"""Causal-LM loss computed a chunk of tokens at a time, so the full logits tensor never exists.

The plain path turns the hidden states of a whole micro-batch into logits (tokens x vocab, then an fp32 copy for
the cross-entropy and an fp32 gradient of the same size). For Baichuan2's 125,696-token vocabulary and 4 rows of
1024 tokens that is about 2 GiB per copy. Here the head and the cross-entropy run over `chunk_tokens` tokens at a
time; backward recomputes each chunk's logits instead of keeping them.

    loss = chunked_causal_lm_loss(hidden_states, head_weight, labels, num_items_in_batch)

    use_chunked_loss(model)      # afterwards model(input_ids=..., labels=...) computes its loss this way

`use_chunked_loss` keeps the call inside the model's own forward, which is where FSDP2 gathers the root
module's parameters (embeddings, final norm and the output head); calling the decoder and the head separately
from outside would use the sharded head.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024  # fp32 logits of one chunk: 1024 x 125,696 x 4 B = 0.5 GiB for Baichuan2


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t is scored against labels[t + 1]; the last position has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def capped_logits(logits: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """fp32 logits, soft-capped as softcap * tanh(logits / softcap) when the model does (Gemma 2's
    final_logit_softcapping)."""
    logits = logits.float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of (hidden @ weight.T) against targets, one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_tokens, softcap):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            logits = capped_logits(hidden[start:start + chunk_tokens] @ weight.t(), softcap)
            total += F.cross_entropy(logits, targets[start:start + chunk_tokens], ignore_index=IGNORE_INDEX,
                                     reduction="sum")
        ctx.save_for_backward(hidden, weight, targets, *([scale] if torch.is_tensor(scale) else []))
        ctx.chunk_tokens, ctx.softcap = chunk_tokens, softcap
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
            rows = hidden[start:start + ctx.chunk_tokens]
            chunk_targets = targets[start:start + ctx.chunk_tokens]
            # d(sum of cross-entropies)/d(logits) = softmax - one_hot(target), zero for ignored positions.
            # Masks by arithmetic, not boolean indexing: no host sync, and it runs on fake tensors.
            counted = (chunk_targets != IGNORE_INDEX).unsqueeze(1)
            logits = capped_logits(rows @ weight.t(), ctx.softcap)
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits.scatter_add_(1, chunk_targets.clamp(min=0).unsqueeze(1), -counted.float())
            if ctx.softcap:  # through softcap * tanh(z / softcap): times 1 - tanh^2
                grad_logits *= 1 - (logits / ctx.softcap).square()
            grad_logits = (grad_logits * (counted * factor)).to(hidden.dtype)
            if grad_hidden is not None:
                torch.matmul(grad_logits, weight, out=grad_hidden[start:start + ctx.chunk_tokens])
            if grad_weight is not None:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), rows)
                else:
                    grad_weight += torch.matmul(grad_logits.t(), rows).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_causal_lm_loss(hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch: int | torch.Tensor | None = None,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                           softcap: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy of `hidden_states @ head_weight.T`, computed `chunk_tokens` tokens at a time.

    hidden_states: (batch, length, hidden) after the final norm; head_weight: (vocab, hidden), already
    row-normalised for Baichuan's NormHead; labels: (batch, length), -100 where no loss is taken. Position t
    predicts labels[t + 1]. The summed token losses are divided by `num_items_in_batch` (the target count of the
    whole global batch) when given, otherwise by this batch's own target count. `softcap`: the model's
    final_logit_softcapping, applied to the logits before the cross-entropy. Under autocast the head runs in
    the autocast dtype and the cross-entropy in fp32, as in the models' own forward.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    targets = shifted_targets(labels.to(hidden_states.device)).reshape(-1)
    if num_items_in_batch is None:
        scale = 1.0 / (targets != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
    elif torch.is_tensor(num_items_in_batch):
        scale = 1.0 / num_items_in_batch.to(hidden_states.device, torch.float32)
    else:  # the training scripts' count is a host int: no tensor made from it, so no host-to-device copy and sync
        scale = 1.0 / float(num_items_in_batch)
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_states, head_weight = hidden_states.to(dtype), head_weight.to(dtype)
    elif head_weight.dtype != hidden_states.dtype:
        head_weight = head_weight.to(hidden_states.dtype)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    with torch.autocast(device_type, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden, head_weight, targets, scale, chunk_tokens, softcap)


def _head_weight(model):
    """The output head's weight as the forward uses it (Baichuan's NormHead normalises its rows)."""
    if hasattr(model, "head_weight"):
        return model.head_weight()
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("use_chunked_loss supports output heads without a bias")
    return head.weight


def use_chunked_loss(model: torch.nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.nn.Module:
    """Make `model(..., labels=...)` compute its loss with `chunked_causal_lm_loss`; returns the model.

    The returned output has `loss` and no `logits`. Calls without labels (generation, logits) keep the model's
    own forward. The model's parameters and state-dict names are unchanged, so checkpoints and FSDP2 sharding
    are unaffected; apply it before or after `fully_shard`. `model` is a ...ForCausalLM with a `.model` decoder
    (Llama, Baichuan); a peft wrapper reaches it through its own forward, so patch the wrapped model.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if getattr(model.config, "z_loss_weight", 0):
        raise ValueError("the chunked loss has no z-loss term; keep it off for models with z_loss_weight > 0")
    for name in ("logit_scale", "logits_scaling"):  # Cohere, Granite: the head's logits are rescaled
        if getattr(model.config, name, 1) not in (None, 1):
            raise ValueError(f"the chunked loss does not apply {name}; keep it off (--chunked-loss off)")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    decoder = model.get_decoder()
    plain_forward = model.forward

    def forward(input_ids=None, labels=None, num_items_in_batch=None, logits_to_keep=0, **kwargs):
        if labels is None:
            return plain_forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        outputs = decoder(input_ids=input_ids, **kwargs)
        loss = chunked_causal_lm_loss(outputs.last_hidden_state, _head_weight(model), labels, num_items_in_batch,
                                      chunk_tokens, softcap)
        return CausalLMOutputWithPast(loss=loss)  # training runs without a cache

    model.forward = forward
    return model
