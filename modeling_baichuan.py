"""Baichuan / Baichuan2 causal language models for transformers 5, without remote code.

The public Baichuan2 releases ship their own modelling code (loaded with ``trust_remote_code``), and that
code no longer runs on transformers 5. This module is an independent implementation of the same checkpoint
format, written from the facts in ``shared/reference/baichuan2/SPEC.md``:

* ``BaichuanConfig``           - config with ``model_type: baichuan`` (reads the release config.json as is).
* ``BaichuanForCausalLM``      - the decoder. One class covers Baichuan2-13B (ALiBi), Baichuan2-7B (rotary)
                                 and Baichuan-13B v1 (plain output head); the variant follows the config.
* ``BaichuanTokenizer``        - the SentencePiece tokenizer, reproducing the release ids.
* ``build_chat_input``         - the release chat prompt: ``[195] user [196] assistant ... [195] user [196]``.

Importing the module registers all three classes with the Auto classes, so an unmodified release folder
loads with ``AutoConfig/AutoTokenizer/AutoModelForCausalLM.from_pretrained(folder)`` and no
``trust_remote_code``: transformers prefers a registered local class and then ignores ``auto_map``.

``attention_mask`` semantics (2-D, covering past + current tokens): 0 is padding; any positive integer is a
segment id. A query attends a key only when both are non-padding, carry the same id and the key is not in the
future, so ``[1, 1, 1, 2, 2, 3, 3, 0, 0]`` packs three independent examples followed by padding.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

USER_TOKEN_ID = 195  # <reserved_106>
ASSISTANT_TOKEN_ID = 196  # <reserved_107>

# Sampling defaults of the Baichuan2 chat release (generation_config.json); usable as GenerationConfig(**...).
RELEASE_GENERATION_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 5,
    "top_p": 0.85,
    "repetition_penalty": 1.05,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

ROTARY_HIDDEN_SIZE = 4096  # the 7B checkpoint is the one with rotary embeddings
NORM_HEAD_VOCAB_SIZE = 125696  # Baichuan2 vocabulary; v1 (64000) has a plain head


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


class BaichuanConfig(PreTrainedConfig):
    """Config of Baichuan / Baichuan2. Defaults are those of Baichuan2-13B.

    ``position_embedding`` ("alibi" | "rope") and ``norm_head`` (bool) default to ``None``, meaning "infer from
    the sizes the way the released checkpoints do": hidden_size 4096 -> rope, else ALiBi; vocab 125696 ->
    NormHead, else a plain head. Set them explicitly for tiny test models.
    """

    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=125696,
        hidden_size=5120,
        intermediate_size=13696,
        num_hidden_layers=40,
        num_attention_heads=40,
        hidden_act="silu",
        model_max_length=4096,
        max_position_embeddings=None,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        z_loss_weight=0.0,
        position_embedding=None,
        norm_head=None,
        rope_theta=10000.0,
        gradient_checkpointing=False,
        **kwargs,
    ):
        # Release configs point auto_map at remote code we do not use; keeping it would make our own saves
        # look like they need remote code again.
        kwargs.pop("auto_map", None)
        if hidden_size % num_attention_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
        if position_embedding not in (None, "alibi", "rope"):
            raise ValueError(f"position_embedding must be 'alibi', 'rope' or None, got {position_embedding!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.model_max_length = model_max_length
        self.max_position_embeddings = max_position_embeddings if max_position_embeddings else model_max_length
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.z_loss_weight = float(z_loss_weight or 0.0)
        self.position_embedding = position_embedding
        self.norm_head = norm_head
        self.rope_theta = rope_theta
        # Some release configs carry `gradient_checkpointing: [false]`; a non-empty list is truthy and would
        # switch checkpointing on in PreTrainedModel, so reduce it to a plain bool.
        if isinstance(gradient_checkpointing, (list, tuple)):
            gradient_checkpointing = any(bool(x) for x in gradient_checkpointing)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def uses_rope(self) -> bool:
        if self.position_embedding is not None:
            return self.position_embedding == "rope"
        return self.hidden_size == ROTARY_HIDDEN_SIZE

    @property
    def uses_norm_head(self) -> bool:
        if self.norm_head is not None:
            return bool(self.norm_head)
        return self.vocab_size == NORM_HEAD_VOCAB_SIZE


# --------------------------------------------------------------------------------------------------------------
# Position encodings and masks
# --------------------------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes: the geometric series for the largest power of two p <= n, then (if n is not a power of
    two) every other slope of the series for 2p, truncated to n - p."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    if p == num_heads:
        return power_of_two_slopes(num_heads)
    return power_of_two_slopes(p) + power_of_two_slopes(2 * p)[0::2][: num_heads - p]


def causal_alibi_bias(num_heads: int, length: int, device, dtype) -> torch.Tensor:
    """(heads, length, length) additive bias: slope * (j - i) for keys j <= i, the dtype minimum above the
    diagonal. Built in float32 (relative form keeps bf16 exact near the diagonal) and cast once."""
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)
    pos = torch.arange(length, device=device, dtype=torch.float32)
    distance = pos[None, :] - pos[:, None]  # j - i
    bias = (slopes[:, None, None] * distance[None]).to(dtype)
    return bias.masked_fill(distance[None] > 0, torch.finfo(dtype).min)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions from a 2-D mask: the index inside each run of equal non-zero ids (so positions restart
    at 0 for every packed segment and skip left padding); padding gets 0."""
    length = attention_mask.shape[-1]
    index = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    starts = torch.ones_like(attention_mask, dtype=torch.bool)
    starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return torch.where(attention_mask > 0, index - run_start, torch.zeros_like(index))


def allowed_attention(attention_mask: torch.Tensor, past_length: int, query_length: int) -> torch.Tensor:
    """(batch, 1, q, kv) bool: causal AND both tokens real AND same segment id."""
    kv_length = attention_mask.shape[-1]
    keys = attention_mask[:, None, None, :]
    queries = attention_mask[:, None, past_length : past_length + query_length, None]
    query_pos = torch.arange(past_length, past_length + query_length, device=attention_mask.device)
    key_pos = torch.arange(kv_length, device=attention_mask.device)
    causal = (key_pos[None, :] <= query_pos[:, None])[None, None]
    return causal & (keys > 0) & (queries > 0) & (keys == queries)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float):
    """cos/sin of shape (batch, 1, seq, head_dim) in float32 (rotate-half convention)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


class BaichuanRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Variance in float32 even for bf16 activations; cast back only for half-precision weights.
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x.to(torch.float32) * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class BaichuanMLP(nn.Module):
    def __init__(self, config: BaichuanConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        if config.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' is supported, got {config.hidden_act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def attend_within_spans(query, key, value, causal_bias, segment_spans):
    """Causal attention inside each (start, end) span of each row, nothing across (packed training rows).

    Only the pairs inside a span are computed, where a block-diagonal mask would compute the whole row and
    discard most of it. `causal_bias` is the ALiBi bias for positions 0..n (already causal), or None for rotary
    models, which then use SDPA's own causal mask.
    """
    out = torch.empty_like(query)
    for row, spans in enumerate(segment_spans):
        for start, end in spans:
            bias = None if causal_bias is None else causal_bias[:, :, :end - start, :end - start]
            out[row:row + 1, :, start:end] = F.scaled_dot_product_attention(
                query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
                attn_mask=bias, is_causal=bias is None)
    return out


class BaichuanAttention(nn.Module):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        # Fused projection as stored in the checkpoint: rows are the q, k and v blocks.
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, rotary=None, past_key_values=None, is_causal=False,
                segment_spans=None):
        batch, length, _ = hidden_states.shape
        qkv = self.W_pack(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # (batch, heads, length, head_dim)

        if rotary is not None:
            cos, sin = rotary
            query = (query.float() * cos + rotate_half(query.float()) * sin).to(value.dtype)
            key = (key.float() * cos + rotate_half(key.float()) * sin).to(value.dtype)

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
            attention_mask = attention_mask.to(query.dtype)  # only under autocast
        if segment_spans is not None:
            out = attend_within_spans(query, key, value, attention_mask, segment_spans)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, length, self.hidden_size)
        return self.o_proj(out)


class BaichuanDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = BaichuanMLP(config)
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, rotary=None, past_key_values=None, is_causal=False,
                use_cache=False, segment_spans=None, **kwargs):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            rotary=rotary,
            past_key_values=past_key_values,
            is_causal=is_causal,
            segment_spans=segment_spans,
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    config: BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, BaichuanRMSNorm):
            init.ones_(module.weight)


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([BaichuanDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # (device, dtype) -> causal ALiBi bias for the longest length seen; sliced for shorter ones. Not a
        # buffer: nothing extra is saved, and it is rebuilt lazily after .to().
        self._alibi_cache: dict = {}
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _cached_alibi(self, length: int, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        bias = self._alibi_cache.get(key)
        if bias is None or bias.shape[-1] < length:
            # Round up so generation (one token longer per step) rebuilds rarely.
            size = max(length, 256)
            size = ((size + 255) // 256) * 256
            bias = causal_alibi_bias(self.config.num_attention_heads, size, device, dtype)
            self._alibi_cache[key] = bias
        return bias

    def _attention_inputs(self, attention_mask, position_ids, past_length, query_length, batch, device, dtype):
        """Build, once per forward, what every layer needs: the SDPA mask, the is_causal flag and rotary cos/sin."""
        kv_length = past_length + query_length
        mask_2d = None
        mask_4d = None
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                if attention_mask.shape[-1] != kv_length:
                    raise ValueError(
                        f"attention_mask has length {attention_mask.shape[-1]}, expected past + current = {kv_length}"
                    )
                # An all-ones mask is plain causal attention; skip the per-batch mask then.
                if not bool((attention_mask == 1).all()):
                    mask_2d = attention_mask
            elif attention_mask.dim() == 4:
                mask_4d = attention_mask  # caller-built: bool "may attend" or additive float
            else:
                raise ValueError("attention_mask must be 2-D (batch, length) or 4-D")

        rotary = None
        if self.config.uses_rope:
            if position_ids is None:
                if mask_2d is not None:
                    position_ids = positions_from_mask(mask_2d)[:, past_length:]
                else:
                    position_ids = torch.arange(past_length, kv_length, device=device)[None].expand(batch, -1)
            rotary = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)

        allowed = allowed_attention(mask_2d, past_length, query_length) if mask_2d is not None else None
        if mask_4d is not None:
            allowed = mask_4d if mask_4d.dtype == torch.bool else None

        if not self.config.uses_rope:
            bias = self._cached_alibi(kv_length, device, dtype)[None, :, past_length:kv_length, :kv_length]
            if allowed is not None:
                bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
            elif mask_4d is not None:
                bias = bias + mask_4d.to(dtype)
            return bias, False, rotary

        if allowed is not None:
            return allowed.logical_not().to(dtype) * torch.finfo(dtype).min, False, rotary
        if mask_4d is not None:
            return mask_4d.to(dtype), False, rotary
        if query_length == 1:
            return None, False, rotary
        if past_length == 0:
            return None, True, rotary
        causal = torch.arange(kv_length, device=device)[None, :] <= torch.arange(past_length, kv_length, device=device)[:, None]
        return causal[None, None], False, rotary

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and any(layer.gradient_checkpointing for layer in self.layers):
            use_cache = False  # recomputation would append to the cache twice
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError("past_key_values must be a transformers Cache (e.g. DynamicCache), not a tuple")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None

        batch, query_length = inputs_embeds.shape[:2]
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        # Under autocast the attention runs in the autocast dtype; build the mask in it so no layer re-casts it.
        device_type = inputs_embeds.device.type
        mask_dtype = inputs_embeds.dtype
        if torch.is_autocast_enabled(device_type):
            mask_dtype = torch.get_autocast_dtype(device_type)
        segment_spans = kwargs.get("segment_spans")
        if segment_spans is not None and past_length == 0:
            # Packed training rows with known spans: each layer attends within spans, no whole-row mask needed.
            if position_ids is None:
                position_ids = torch.zeros((batch, query_length), dtype=torch.long)
                for row, spans in enumerate(segment_spans):
                    for start, end in spans:
                        position_ids[row, start:end] = torch.arange(end - start)
                position_ids = position_ids.to(inputs_embeds.device)
            rotary = None
            if self.config.uses_rope:
                rotary = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
            mask = None if self.config.uses_rope else self._cached_alibi(query_length, inputs_embeds.device,
                                                                           mask_dtype)[None]
            is_causal = False
        else:
            segment_spans = None
            mask, is_causal, rotary = self._attention_inputs(
                attention_mask, position_ids, past_length, query_length, batch, inputs_embeds.device, mask_dtype
            )

        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                rotary=rotary,
                past_key_values=past_key_values,
                is_causal=is_causal,
                use_cache=use_cache,
                segment_spans=segment_spans,
            )
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=None,  # SDPA does not expose attention weights
        )


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.model = BaichuanModel(config)
        # Stored un-normalised; with NormHead the rows are L2-normalised on every forward (gradient flows through).
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def head_weight(self) -> torch.Tensor:
        if self.config.uses_norm_head:
            return F.normalize(self.lm_head.weight, dim=-1, eps=1e-12)
        return self.lm_head.weight

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        **kwargs,
    ):
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            segment_spans=kwargs.get("segment_spans"),
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = F.linear(hidden_states, self.head_weight())

        loss = None
        if labels is not None:
            loss = self.causal_lm_loss(logits, labels, num_items_in_batch)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=None,
        )
        if return_dict is False:
            return output.to_tuple()
        return output

    def causal_lm_loss(self, logits, labels, num_items_in_batch=None):
        """Next-token cross entropy (labels shifted here, -100 ignored, mean over counted tokens) plus
        z_loss_weight * mean(max_logit ** 2) over all shifted positions."""
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:].to(logits.device)
        total = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100,
            reduction="sum",
        )
        if num_items_in_batch is not None:
            count = torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
        else:
            count = (shift_labels != -100).sum().clamp(min=1).to(total.dtype)
        loss = total / count
        if self.config.z_loss_weight and self.config.uses_norm_head:
            loss = loss + self.config.z_loss_weight * shift_logits.max(dim=-1).values.pow(2).mean()
        return loss


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


class BaichuanTokenizer(SentencePieceBackend):
    """SentencePiece tokenizer of Baichuan / Baichuan2.

    The model file is used as is (no dummy prefix, digits split and byte fallback come from the model itself), so
    ``tokenizer(text, add_special_tokens=False).input_ids == SentencePieceProcessor(model).encode(text)`` for text
    without the literal special strings ``<unk>``, ``<s>``, ``</s>`` (those map to their ids, as in the release).
    No BOS/EOS is added unless ``add_bos_token`` / ``add_eos_token`` is set; padding uses ``<unk>`` (id 0).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        add_bos_token=False,
        add_eos_token=False,
        sp_model_kwargs=None,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.pop("legacy", None)
        kwargs.pop("special_tokens_pattern", None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=sp_model_kwargs or {},
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            legacy=True,  # encode text exactly as SentencePiece does
            special_tokens_pattern="none",
            **kwargs,
        )

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            ids = list(token_ids_0) + list(token_ids_1 or [])
            return [1 if i in special else 0 for i in ids]
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def num_special_tokens_to_add(self, pair=False):
        return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)

    def convert_tokens_to_string(self, tokens):
        # SentencePiece decodes byte-fallback pieces and "▁"; special tokens are kept as their text.
        special = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
        return "".join(out)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        special_ids = set(self.all_special_ids)
        base_size = self.sp_model.get_piece_size()
        out, run = [], []
        for i in token_ids:
            i = int(i)
            if i in special_ids or i >= base_size:
                out.append(self.sp_model.decode(run))
                run = []
                if not (skip_special_tokens and i in special_ids):
                    out.append(self.convert_ids_to_tokens(i))
            else:
                run.append(i)
        out.append(self.sp_model.decode(run))
        text = "".join(out)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers drops add_bos/eos_token from the saved config; write them (and the class) back so the
        # folder reads like the release and reloads with the same behaviour.
        config_path = os.path.join(str(save_directory), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            config.update(
                tokenizer_class="BaichuanTokenizer",
                add_bos_token=bool(self.add_bos_token),
                add_eos_token=bool(self.add_eos_token),
            )
            config.pop("auto_map", None)
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
                f.write("\n")
        return files


# --------------------------------------------------------------------------------------------------------------
# Chat prompt
# --------------------------------------------------------------------------------------------------------------


def build_chat_input(
    tokenizer,
    messages,
    max_new_tokens: int = 2048,
    model_max_length: int = 4096,
    user_token_id: int = USER_TOKEN_ID,
    assistant_token_id: int = ASSISTANT_TOKEN_ID,
) -> list[int]:
    """Prompt ids in the Baichuan2 chat format: ``[user_id] + user + [assistant_id] + assistant`` per past
    round, then ``[user_id] + user + [assistant_id]``. An optional leading "system" message is prepended as plain
    text. When the prompt exceeds ``model_max_length - max_new_tokens`` the oldest rounds are dropped (the last
    round is always kept, cut from the left if it alone is too long)."""
    if not messages:
        raise ValueError("messages is empty")

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    system = []
    if messages[0].get("role") == "system":
        system = encode(messages[0]["content"])
        messages = messages[1:]

    rounds, current = [], []
    for message in messages:
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}")
        if role == "user" and current:
            rounds.append(current)
            current = []
        current += [user_token_id if role == "user" else assistant_token_id] + encode(message["content"])
    if current:
        rounds.append(current)
    if messages and messages[-1]["role"] != "assistant":
        rounds[-1] = rounds[-1] + [assistant_token_id]

    budget = max(model_max_length - max_new_tokens, 1)
    history: list[int] = []
    for round_ids in reversed(rounds):
        if history and len(system) + len(history) + len(round_ids) > budget:
            break
        history = round_ids + history
    return (system + history)[-budget:]


# --------------------------------------------------------------------------------------------------------------
# Registration with the Auto classes
# --------------------------------------------------------------------------------------------------------------

AutoConfig.register("baichuan", BaichuanConfig, exist_ok=True)
AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaichuanTokenizer, exist_ok=True)

__all__ = [
    "ASSISTANT_TOKEN_ID",
    "BaichuanConfig",
    "BaichuanForCausalLM",
    "BaichuanModel",
    "BaichuanPreTrainedModel",
    "BaichuanTokenizer",
    "RELEASE_GENERATION_DEFAULTS",
    "USER_TOKEN_ID",
    "alibi_slopes",
    "build_chat_input",
]
