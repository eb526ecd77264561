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
``save_pretrained`` copies this file into the output folder and points ``auto_map`` at it, so the folder
also loads elsewhere with ``trust_remote_code=True``. The file therefore imports nothing but the standard
library, torch and transformers.

Attention follows ``config._attn_implementation`` (``attn_implementation=`` at load time) through
transformers' ``AttentionInterface``: "eager", "sdpa", "flex_attention", "flash_attention_*" or any registered
function. ALiBi reaches each backend in its own form: an additive bias (eager, sdpa, registered functions), a
score modifier (flex) or slopes (FlashAttention 2).

Which query may attend which key:

* ``attention_mask`` (2-D, past + current tokens): 0 is padding, any positive integer an example id. A query
  attends earlier keys of its own example, so ``[1, 1, 1, 2, 2, 3, 3, 0, 0]`` packs three independent
  examples followed by padding. A padding query attends only to itself: its output is finite and does not
  depend on how much padding there is.
* no ``attention_mask`` but ``position_ids`` that restart (packed rows, empty or no cache): every run of
  increasing positions is one example, as in transformers' own models. FlashAttention gets the matching
  ``cu_seq_lens_*`` from these (or takes them as keyword arguments, as Llama needs for more than one row).
  This is the packed form Llama and Baichuan share:
  ``model(input_ids=..., position_ids=..., labels=..., num_items_in_batch=..., use_cache=False)``.
* ``example_spans=`` (per-row lists of (start, end)): the training path, one SDPA call per example; the
  training scripts use it: on a CPU it is faster than one masked call over the whole row. Loaded with
  ``attn_implementation="flex_attention"`` or a FlashAttention, the spans become example ids (as the 2-D mask
  above) and each layer makes one kernel call for the whole micro-batch, ALiBi in the kernel's own form.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.flash_attention import get_target_dtype
from transformers.integrations.flex_attention import compile_friendly_flex_attention
from transformers.masking_utils import (
    causal_mask_function,
    fast_all,
    find_packed_sequence_indices,
    flex_attention_mask,
    sdpa_mask,
)
from transformers.modeling_flash_attention_utils import _upad_input, lazy_import_flash_attention
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.import_utils import is_tracing
from transformers.utils.output_capturing import capture_outputs

logger = logging.get_logger(__name__)

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
RELEASE_CODE_FILE = "modeling_baichuan.py"
# Present in this file (and in its copies in saved folders), never in the release code: the variant scan must
# not read this implementation, which mentions both position encodings, as a release file.
IMPLEMENTATION_TAG = "baichuan-transformers5-without-remote-code"

# transformers 5.24 renamed the cache argument and output field from ``past_key_values`` to ``cache``.
# The forwards take either name; outputs use the field this version's output classes have.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(cache, kwargs: dict):
    """The cache passed as ``cache=`` or under its older name ``past_key_values=`` (removed from kwargs)."""
    legacy = kwargs.pop("past_key_values", None)
    if cache is not None and legacy is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return legacy if cache is None else cache


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


def variant_from_sizes(hidden_size: int, vocab_size: int) -> dict:
    """The release code's own rule: hidden 4096 is the rotary 7B; vocabulary 125696 has the NormHead."""
    return {
        "position_embedding": ("rope" if hidden_size == ROTARY_HIDDEN_SIZE else "alibi", f"hidden_size {hidden_size}"),
        "norm_head": (vocab_size == NORM_HEAD_VOCAB_SIZE, f"vocab_size {vocab_size}"),
    }


def variant_from_code(text: str, source: str) -> dict:
    """What a release modelling file shows, read as text (never executed): a ``NormHead`` class or not, and
    ALiBi or a rotary embedding class. Fields the text does not settle are left out."""
    found = {"norm_head": (re.search(r"^class\s+NormHead\b", text, re.M) is not None, source)}
    alibi = re.search(r"alibi", text, re.I) is not None
    rotary = re.search(r"^class\s+\w*Rotary\w*", text, re.M) is not None
    if alibi != rotary:
        found["position_embedding"] = ("alibi" if alibi else "rope", source)
    return found


def release_code_text(folder, auto_map) -> tuple[str, str] | None:
    """(text, path) of the modelling file a local folder ships, or None (hub ids, no file, or this very file)."""
    if not folder:
        return None
    folder = str(folder)
    if os.path.isfile(folder):
        folder = os.path.dirname(folder)
    name = RELEASE_CODE_FILE
    model_ref = (auto_map or {}).get("AutoModelForCausalLM")
    if isinstance(model_ref, str) and "--" not in model_ref and "." in model_ref:
        name = model_ref.rsplit(".", 1)[0] + ".py"
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if IMPLEMENTATION_TAG in text:
        return None
    return text, path


def resolve_variant(position_embedding, norm_head, hidden_size, vocab_size, folder=None, auto_map=None):
    """Fill the variant fields a config leaves out: from the folder's release code if it has any, else from the
    sizes. Logs which rule decided; a guess from the sizes is a warning (a resized vocabulary fools it)."""
    missing = [name for name, value in (("position_embedding", position_embedding), ("norm_head", norm_head))
               if value is None]
    if not missing:
        return position_embedding, norm_head
    decided = variant_from_sizes(hidden_size, vocab_size)
    code = release_code_text(folder, auto_map)
    from_code = variant_from_code(*code) if code is not None else {}
    decided.update(from_code)
    values = {"position_embedding": position_embedding, "norm_head": norm_head}
    notes = []
    for name in missing:
        values[name], reason = decided[name]
        notes.append(f"{name}={values[name]!r} (from {reason})")
    message = "Baichuan config has no " + " / ".join(missing) + ": " + ", ".join(notes)
    if all(name in from_code for name in missing):
        logger.info(message)
    else:
        logger.warning(message + "; a guess from sizes, write the field into config.json if it is wrong")
    return values["position_embedding"], bool(values["norm_head"])


def code_module_name(cls) -> str:
    """The module name under which a saved folder's auto_map finds the copy of this file."""
    return cls.__module__.rsplit(".", 1)[-1]


def own_auto_map(auto_map, module: str) -> dict:
    """The auto_map entries that name this file (save_pretrained writes them): kept, so a saved config loads back
    unchanged. A release's other entries name remote code that our saved folders do not ship."""

    def names_this_file(reference):
        if isinstance(reference, (list, tuple)):  # tokenizers: [slow, fast]
            reference = reference[0] if reference else None
        return isinstance(reference, str) and reference.startswith(module + ".")

    if not isinstance(auto_map, dict):
        return {}
    return {key: value for key, value in auto_map.items() if names_this_file(value)}


# --- validation: each wrong value is one ValueError naming its key ---------------------------------------------

# The private keyword that carries the loading folder from from_pretrained to __init__ (for the variant lookup)
# without the config recording it: a config saved and loaded back must equal the original.
LOADING_FOLDER_KEY = "_baichuan_loading_folder"

BOOL_KEYS = ("use_cache", "tie_word_embeddings")
POSITIVE_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "model_max_length")
POSITIVE_NUMBER_KEYS = ("rms_norm_eps", "rope_theta")
NON_NEGATIVE_NUMBER_KEYS = ("initializer_range",)


def json_kind(value) -> str:
    """A value as config.json shows it, for error messages: 'the string "false"', 'the array [0]', 'null'."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    kinds = {bool: "the boolean", str: "the string", list: "the array", tuple: "the array", dict: "the object",
             int: "the number", float: "the number"}
    return text if value is None else f"{kinds.get(type(value), 'the value')} {text}"


def config_error(key: str, expected: str, value) -> ValueError:
    return ValueError(f"Baichuan config: {key} must be {expected}, got {json_kind(value)}")


def is_bool(value) -> bool:
    return isinstance(value, bool)


def is_number(value) -> bool:
    # bool is an int to Python, never a number in a config; NaN and infinities are not sizes or rates either
    return isinstance(value, (int, float)) and not is_bool(value) and math.isfinite(value)


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not is_bool(value) and value > 0


def check_config_values(values: dict) -> None:
    """Types and ranges of the Baichuan keys. Booleans must be real JSON booleans: `"false"` is truthy and `[0]` a
    non-empty list, and either would quietly switch a feature on."""
    for key in BOOL_KEYS:
        if not is_bool(values[key]):
            raise config_error(key, "true or false", values[key])
    if values["norm_head"] is not None and not is_bool(values["norm_head"]):
        raise config_error("norm_head", "true, false or null", values["norm_head"])
    checkpointing = values["gradient_checkpointing"]
    # Release configs write `[false]`; a list of booleans is accepted as such.
    if not (is_bool(checkpointing) or isinstance(checkpointing, (list, tuple)) and all(map(is_bool, checkpointing))):
        raise config_error("gradient_checkpointing", "true or false", checkpointing)
    for key in POSITIVE_INT_KEYS:
        if not is_positive_int(values[key]):
            raise config_error(key, "a positive integer", values[key])
    if values["max_position_embeddings"] is not None and not is_positive_int(values["max_position_embeddings"]):
        raise config_error("max_position_embeddings", "a positive integer or null", values["max_position_embeddings"])
    for key in POSITIVE_NUMBER_KEYS:
        if not (is_number(values[key]) and values[key] > 0):
            raise config_error(key, "a positive number", values[key])
    for key in NON_NEGATIVE_NUMBER_KEYS:
        if not (is_number(values[key]) and values[key] >= 0):
            raise config_error(key, "a number >= 0", values[key])
    z_loss_weight = values["z_loss_weight"]
    if z_loss_weight is not None and not (is_number(z_loss_weight) and z_loss_weight >= 0):
        raise config_error("z_loss_weight", "a number >= 0 or null", z_loss_weight)
    if values["position_embedding"] not in (None, "alibi", "rope"):
        raise config_error("position_embedding", '"alibi", "rope" or null', values["position_embedding"])
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(f"Baichuan config: hidden_size {values['hidden_size']} must be a multiple of "
                         f"num_attention_heads {values['num_attention_heads']}")


class BaichuanConfig(PreTrainedConfig):
    """Config of Baichuan / Baichuan2. Defaults are those of Baichuan2-13B.

    ``position_embedding`` ("alibi" | "rope") and ``norm_head`` (bool) are resolved when the config is built:
    from the value given, else from the loading folder's release code (``modeling_baichuan.py``, read as text),
    else from the sizes the way the released checkpoints do (hidden_size 4096 -> rope, else ALiBi; vocab
    125696 -> NormHead, else a plain head). The resolved values are what every saved config holds.

    Every key's type and range is checked when the config is built (booleans must be JSON booleans, sizes positive
    integers); a wrong value is a one-line ValueError that names the key.
    """

    model_type = "baichuan"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

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
        check_config_values(locals())  # the arguments above, by name
        # A release auto_map names remote code our saved folders lack; save_pretrained writes entries of our own.
        auto_map = kwargs.pop("auto_map", None)
        kept_auto_map = own_auto_map(auto_map, code_module_name(type(self)))
        if kept_auto_map:
            kwargs["auto_map"] = kept_auto_map
        folder = kwargs.pop(LOADING_FOLDER_KEY, None) or kwargs.get("name_or_path")
        position_embedding, norm_head = resolve_variant(
            position_embedding, norm_head, hidden_size, vocab_size, folder, auto_map)
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
            gradient_checkpointing = any(gradient_checkpointing)
        self.gradient_checkpointing = gradient_checkpointing
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # The variant lookup reads the loading folder's release code. AutoConfig hands the folder on as
        # name_or_path, which the config then records; a direct call passes it privately instead, so the loaded
        # config equals the one that was saved (as transformers' own configs do).
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        kwargs.setdefault(LOADING_FOLDER_KEY, folder)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        if not isinstance(config_dict, dict):
            raise ValueError(f"Baichuan config: config.json must hold a JSON object of settings, got "
                             f"{json_kind(config_dict)}")
        folder = kwargs.pop(LOADING_FOLDER_KEY, None)
        if folder is not None:  # only from_dict's own keys reach __init__
            config_dict = {**config_dict, LOADING_FOLDER_KEY: folder}
        return super().from_dict(config_dict, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def uses_rope(self) -> bool:
        return self.position_embedding == "rope"

    @property
    def uses_norm_head(self) -> bool:
        return bool(self.norm_head)


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


def alibi_bias(slopes: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor, dtype) -> torch.Tensor:
    """(1, heads, q, kv) additive bias slope * (j - i). Relative form in float32, cast once, so bf16 stays exact
    near the diagonal."""
    distance = (key_positions[None, :] - query_positions[:, None]).to(torch.float32)
    return (slopes.to(torch.float32)[:, None, None] * distance)[None].to(dtype)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions from a 2-D mask: the index inside each run of equal non-zero ids (so positions restart
    at 0 for every packed example and skip left padding); padding gets 0."""
    length = attention_mask.shape[-1]
    index = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    starts = torch.ones_like(attention_mask, dtype=torch.bool)
    starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return torch.where(attention_mask > 0, index - run_start, torch.zeros_like(index))


def example_mask_function(example_ids: torch.Tensor):
    """Mask function in transformers' masking_utils convention (True = may attend): causal within an example
    (ids > 0); a padding query (id 0) attends to itself only, so it never attends to nothing."""

    def may_attend(batch_idx, head_idx, q_idx, kv_idx):
        q_example = example_ids[batch_idx, q_idx]
        kv_example = example_ids[batch_idx, kv_idx]
        same_example = (q_example == kv_example) & (kv_example > 0) & (kv_idx <= q_idx)
        return same_example | (kv_idx == q_idx)

    return may_attend


def pad_example_ids(example_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad with 0 (padding) to `length`: static caches and flex blocks look at keys past the mask."""
    missing = length - example_ids.shape[-1]
    return F.pad(example_ids, (0, missing)) if missing > 0 else example_ids


def varlen_from_example_ids(example_ids: torch.Tensor) -> dict:
    """FlashAttention varlen keywords for rows laid end to end: a sequence starts at every row start, every
    change of example id and every padding token (so padding attends to itself only, as in the other backends)."""
    starts = torch.ones_like(example_ids, dtype=torch.bool)
    starts[:, 1:] = (example_ids[:, 1:] != example_ids[:, :-1]) | (example_ids[:, 1:] == 0)
    begin = starts.flatten().nonzero().flatten().to(torch.int32)
    end = torch.tensor([example_ids.numel()], dtype=torch.int32, device=example_ids.device)
    cu_seq_lens = torch.cat([begin, end])
    max_length = int(cu_seq_lens.diff().max())  # the varlen kernels take a host int
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length, "max_length_k": max_length}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float):
    """cos/sin of shape (batch, 1, seq, head_dim) in float32 (rotate-half convention)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(query, key, cos, sin):
    """Rotate q and k in float32 and cast back, as the release does."""
    rotated = [(t.float() * cos + rotate_half(t.float()) * sin).to(t.dtype) for t in (query, key)]
    return rotated[0], rotated[1]


def is_flash_implementation(implementation: str | None) -> bool:
    return bool(implementation) and "flash" in implementation


# --------------------------------------------------------------------------------------------------------------
# Attention functions (AttentionInterface signature: module, q, k, v, mask, ... -> (out (b, l, h, d), weights))
# --------------------------------------------------------------------------------------------------------------


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain attention with an additive mask; returns the weights (for output_attentions)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def flex_attention_with_alibi(module, query, key, value, attention_mask, scaling=None, alibi_slopes=None,
                              alibi_query_shift=0, **kwargs):
    """FlexAttention with ALiBi as a score modifier: slope * (key index - query index), no dense bias.
    `attention_mask` is the BlockMask; `alibi_query_shift` = query offset - key offset (cached decoding)."""
    if attention_mask is not None and not hasattr(attention_mask, "mask_mod"):
        raise ValueError("flex_attention with ALiBi needs a BlockMask, not a dense 4-D mask")

    def add_alibi(score, batch_idx, head_idx, q_idx, kv_idx):
        return score + alibi_slopes[head_idx] * (kv_idx - q_idx - alibi_query_shift).to(score.dtype)

    out = compile_friendly_flex_attention(query, key, value, score_mod=add_alibi, block_mask=attention_mask,
                                          scale=scaling, training=module.training)
    return out.transpose(1, 2).contiguous(), None


def flash_attention_with_alibi(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                               alibi_slopes=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                               max_length_k=None, **kwargs):
    """FlashAttention 2 takes ALiBi slopes natively (bias -slope * |i - j|, i.e. slope * (j - i) under the causal
    mask). Rows are passed padding-free when cu_seq_lens are given, unpadded when a 2-D padding mask is."""
    (flash_fn, varlen_fn, _, pad_fn, unpad_fn), _ = lazy_import_flash_attention(module.config._attn_implementation)
    if varlen_fn is None or "alibi_slopes" not in inspect.signature(varlen_fn).parameters:
        raise ValueError(f"{module.config._attn_implementation} takes no ALiBi slopes; use flash_attention_2, "
                         "flex_attention or sdpa for this Baichuan variant")
    batch, heads, q_length, head_dim = query.shape
    out_dtype = query.dtype
    # As transformers does for its own models: float32 activations go in the autocast / weight dtype.
    kernel_dtype = get_target_dtype(query, module) or query.dtype
    q, k, v = (t.transpose(1, 2).to(kernel_dtype) for t in (query, key, value))  # (batch, length, heads, head_dim)
    options = {"softmax_scale": scaling, "causal": True, "dropout_p": dropout,
               "alibi_slopes": alibi_slopes.to(device=q.device, dtype=torch.float32)}
    if cu_seq_lens_q is not None:
        out = varlen_fn(q.reshape(-1, heads, head_dim), k.reshape(-1, heads, head_dim), v.reshape(-1, heads, head_dim),
                        cu_seqlens_q=cu_seq_lens_q, cu_seqlens_k=cu_seq_lens_k, max_seqlen_q=max_length_q,
                        max_seqlen_k=max_length_k, **options)
        out = out.reshape(batch, q_length, heads, head_dim)
    elif attention_mask is not None:
        q, k, v, indices, (cu_q, cu_k), (max_q, max_k) = _upad_input(q, k, v, attention_mask, q_length, unpad_fn)
        out = varlen_fn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                        **options)
        out = pad_fn(out, indices, batch, q_length)
    else:
        out = flash_fn(q, k, v, **options)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(out_dtype), None


def tiled_spans(spans, length: int) -> list[tuple[int, int, bool]]:
    """(start, end, is_span) pieces covering 0..length in order: the spans, and the gaps between them (if any)."""
    pieces, at = [], 0
    for start, end in spans:
        if start > at:
            pieces.append((at, start, False))
        pieces.append((start, end, True))
        at = end
    if at < length:
        pieces.append((at, length, False))
    return pieces


def span_example_ids(example_spans, batch: int, length: int, device) -> torch.Tensor:
    """(batch, length) example ids of packed rows: 1, 2, ... for each row's spans, 0 in none (the padding tail).
    A layout that already carries them as a tensor (`example_ids`, -1 in no span) is used as it is."""
    ids = getattr(example_spans, "example_ids", None)
    if ids is not None and tuple(ids.shape) == (batch, length):
        return (ids.to(device=device, dtype=torch.long) + 1)
    ids = torch.zeros((batch, length), dtype=torch.long)
    for row, spans in enumerate(example_spans):
        for index, (start, end) in enumerate(spans):
            ids[row, start:end] = index + 1
    return ids.to(device)


def attend_within_spans(query, key, value, causal_bias, example_spans, scaling=None):
    """The training path (``example_spans=`` keyword): one causal SDPA call per (start, end) span of each row;
    positions outside every span get zeros. `causal_bias` is the ALiBi bias for positions 0..n (already causal),
    or None for rotary models.

    Each row is split into its spans and the outputs concatenated: backward then joins the span gradients once,
    where writing each span into a preallocated output gave every span a full-size zero gradient to add up."""
    rows = []
    for row, spans in enumerate(example_spans):
        pieces = tiled_spans(spans, query.shape[2])
        lengths = [end - start for start, end, _ in pieces]
        splits = zip(*(t[row:row + 1].split(lengths, dim=2) for t in (query, key, value)), strict=True)
        outputs = []
        for (q, k, v), (start, end, is_span) in zip(splits, pieces, strict=True):
            if not is_span:
                outputs.append(torch.zeros_like(q))
                continue
            bias = None if causal_bias is None else causal_bias[:, :, :end - start, :end - start]
            outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None,
                                                          scale=scaling))
        rows.append(torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0])
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()


def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa function; on the CPU, half-precision activations attend in float32.

    The CPU kernel sums bf16/fp16 in an order that depends on the key length (one path below 16 keys, another for
    partial blocks), so the same example came out an ulp apart padded and packed. The final RMSNorm and the
    NormHead carry that ulp to the logits: up to 2 bf16 ulps apart, past transformers' padded vs padding-free
    tolerance. In float32 the summation order no longer shows once the result is cast back. GPUs keep their
    half-precision kernels."""
    sdpa = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", eager_attention)
    if query.device.type != "cpu" or query.dtype not in (torch.float16, torch.bfloat16):
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype.is_floating_point:
        attention_mask = attention_mask.float()  # the ALiBi bias: exact in float32
    with torch.autocast("cpu", enabled=False):  # CPU autocast would cast the float32 inputs straight back
        out, weights = sdpa(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def attention_function(implementation: str, uses_alibi: bool):
    """The function for a backend. ALiBi needs its own flex and flash forms; everything else (and every
    registered custom function) comes from transformers' AttentionInterface, with ALiBi inside the mask."""
    if uses_alibi and implementation == "flex_attention":
        return flex_attention_with_alibi
    if uses_alibi and is_flash_implementation(implementation):
        return flash_attention_with_alibi
    if implementation == "sdpa":
        return sdpa_attention
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)


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


class BaichuanAttention(nn.Module):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.num_key_value_groups = 1  # no grouped-query attention (the attention functions read this)
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        # Fused projection as stored in the checkpoint: rows are the q, k and v blocks.
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None,
                attention_implementation=None, example_spans=None, **kwargs):
        batch, length, _ = hidden_states.shape
        qkv = self.W_pack(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # (batch, heads, length, head_dim)
        if position_embeddings is not None:
            query, key = apply_rotary(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype.is_floating_point \
                and attention_mask.dtype != query.dtype:
            attention_mask = attention_mask.to(query.dtype)  # only under autocast
        if example_spans is not None:
            out, weights = attend_within_spans(query, key, value, attention_mask, example_spans, self.scaling), None
        else:
            implementation = attention_implementation or self.config._attn_implementation
            attend = attention_function(implementation, uses_alibi=not self.config.uses_rope)
            out, weights = attend(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out.reshape(batch, length, self.hidden_size)), weights


class BaichuanDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = BaichuanMLP(config)
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None,
                use_cache=False, **kwargs):
        attended, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    config: BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": BaichuanDecoderLayer, "attentions": BaichuanAttention}

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


class Sizes(NamedTuple):
    """What the masks need to know: the query block sits at query_offset, the keys at key_offset (both 0
    without a cache; query_offset is a tensor for static caches)."""

    batch: int
    query_length: int
    key_length: int
    query_offset: int | torch.Tensor
    key_offset: int

    @classmethod
    def of(cls, cache, batch: int, query_length: int) -> "Sizes":
        if cache is None:
            return cls(batch, query_length, query_length, 0, 0)
        key_length, key_offset = cache.get_mask_sizes(query_length, 0)
        return cls(batch, query_length, key_length, cache.get_seq_length(), key_offset)

    @property
    def is_prefill(self) -> bool:
        return isinstance(self.query_offset, int) and self.query_offset == 0 and self.key_length == self.query_length

    @property
    def keys_are_seen_tokens(self) -> bool:
        """The keys are exactly the past and current tokens: no slots of a static cache that are not written yet."""
        return (isinstance(self.query_offset, int) and self.key_offset == 0
                and self.key_length == self.query_offset + self.query_length)

    def query_positions(self, device) -> torch.Tensor:
        return torch.arange(self.query_length, device=device) + self.query_offset

    def key_positions(self, device) -> torch.Tensor:
        return torch.arange(self.key_length, device=device) + self.key_offset


def mask_function_for(example_ids, sizes: Sizes):
    """Plain causal without example ids; else the example rule over ids padded to whole flex blocks (ids past
    the end read as padding)."""
    if example_ids is None:
        return causal_mask_function
    block = 128
    longest = sizes.key_length + sizes.key_offset
    if isinstance(sizes.query_offset, int):
        longest = max(longest, sizes.query_length + sizes.query_offset)
    return example_mask_function(pad_example_ids(example_ids, -(-longest // block) * block))


def flash_inputs(example_ids, slopes, sizes: Sizes, caller_varlen: bool):
    """No mask when nothing is masked or the caller passed cu_seq_lens; varlen keywords for a prefill with
    examples or padding; the 2-D padding mask for cached decoding (flash unpads it)."""
    extra = {} if slopes is None else {"alibi_slopes": slopes}
    if example_ids is None or caller_varlen:
        return None, extra
    if sizes.is_prefill:
        return None, {**extra, **varlen_from_example_ids(example_ids)}
    return example_ids > 0, extra


def flex_inputs(may_attend, slopes, sizes: Sizes, device):
    block_mask = flex_attention_mask(sizes.batch, sizes.query_length, sizes.key_length, sizes.query_offset,
                                     sizes.key_offset, mask_function=may_attend, device=device)
    if slopes is None:
        return block_mask, {}
    # The shift goes in as a tensor: a Python int that changes between calls becomes a symbolic int, which the
    # CPU flex kernel fails to compile (torch 2.13).
    shift = torch.as_tensor(sizes.query_offset - sizes.key_offset, device=device)
    return block_mask, {"alibi_slopes": slopes, "alibi_query_shift": shift}


def dense_inputs(implementation, may_attend, has_example_ids, slopes, sizes: Sizes, dtype, device):
    """sdpa: a bool mask (None = its causal flag); eager and registered functions: an additive float mask. With
    ALiBi always the additive bias, -inf-like where attention is not allowed."""
    # transformers drops the causal mask for a single query, which is right only when the keys end at it; a static
    # cache's unwritten slots (zeros) must stay masked.
    skip_causal = implementation == "sdpa" and slopes is None and not has_example_ids and sizes.keys_are_seen_tokens
    allowed = sdpa_mask(sizes.batch if has_example_ids else 1, sizes.query_length, sizes.key_length, sizes.query_offset,
                        sizes.key_offset, mask_function=may_attend, allow_is_causal_skip=skip_causal, device=device)
    if allowed is None:
        return None
    if slopes is not None:
        bias = alibi_bias(slopes, sizes.query_positions(device), sizes.key_positions(device), dtype)
        return torch.where(allowed, bias, torch.finfo(dtype).min)
    if implementation == "sdpa":
        return allowed
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)


def with_alibi(attention_mask, slopes, sizes: Sizes, dtype, device):
    """A caller-built 4-D mask (bool "may attend" or additive float) plus the ALiBi bias, if any."""
    if slopes is None:
        return attention_mask
    bias = alibi_bias(slopes, sizes.query_positions(device), sizes.key_positions(device), dtype)
    bias = bias[..., : attention_mask.shape[-1]]
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, bias, torch.finfo(dtype).min)
    return bias + attention_mask.to(dtype)


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([BaichuanDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._causal_alibi_cache = {}  # (dtype, device) -> bias of the training path; not a weight, never saved
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _examples_and_positions(self, attention_mask, position_ids, sizes: Sizes, device):
        """Segment ids over past + current keys (None: plain causal) and the current tokens' positions. A 2-D mask
        covers past + current tokens, or a static cache's whole length (generate pads it: one shape every step)."""
        batch, query_length, query_offset = sizes.batch, sizes.query_length, sizes.query_offset
        example_ids = None
        if attention_mask is not None and attention_mask.dim() == 2:
            length = attention_mask.shape[-1]
            if isinstance(query_offset, int) and length not in (query_offset + query_length, sizes.key_length):
                raise ValueError(f"attention_mask has length {length}, expected past + current = "
                                 f"{query_offset + query_length}")
            example_ids = attention_mask.to(device=device, dtype=torch.long)
            if position_ids is None:
                position_ids = positions_from_mask(example_ids).index_select(-1, sizes.query_positions(device))
            # An all-ones mask is plain causal attention, which needs no per-row mask. Reading the values is
            # skipped while tracing (export, compile), which then keeps the general mask.
            if not is_tracing(example_ids) and bool(fast_all(example_ids == 1)):
                example_ids = None
        elif attention_mask is None and position_ids is not None and sizes.is_prefill:
            # Packed rows in transformers' padding-free form: positions restart at every example. (Llama looks
            # only without a cache object, so it needs use_cache=False; an empty cache is enough here.)
            packed = find_packed_sequence_indices(position_ids.expand(batch, -1))
            example_ids = None if packed is None else packed + 1
        if position_ids is None:
            position_ids = (torch.arange(query_length, device=device) + query_offset)[None].expand(batch, -1)
        return example_ids, position_ids

    def _attention_inputs(self, implementation, attention_mask, example_ids, sizes: Sizes, dtype, device,
                          caller_varlen=False):
        """The mask in the form the backend takes, and extra keywords for it; built once for all layers."""
        slopes = None
        if not self.config.uses_rope:
            slopes = torch.tensor(alibi_slopes(self.config.num_attention_heads), device=device)
        if attention_mask is not None and attention_mask.dim() == 4:
            return with_alibi(attention_mask, slopes, sizes, dtype, device), {}
        if is_flash_implementation(implementation):
            return flash_inputs(example_ids, slopes, sizes, caller_varlen)
        may_attend = mask_function_for(example_ids, sizes)
        if implementation == "flex_attention":
            return flex_inputs(may_attend, slopes, sizes, device)
        return dense_inputs(implementation, may_attend, example_ids is not None, slopes, sizes, dtype, device), {}

    def _training_span_inputs(self, example_spans, position_ids, batch, query_length, dtype, device):
        """Mask and positions of the training path (``example_spans=``): the causal ALiBi bias covering the
        longest span (None for rotary models), and positions restarting at every span if none are given."""
        if position_ids is None:
            position_ids = torch.zeros((batch, query_length), dtype=torch.long)
            for row, spans in enumerate(example_spans):
                for start, end in spans:
                    position_ids[row, start:end] = torch.arange(end - start)
            position_ids = position_ids.to(device)
        if self.config.uses_rope:
            return None, position_ids
        longest = max((end - start for spans in example_spans for start, end in spans), default=1)
        return self._causal_alibi(longest, dtype, device), position_ids

    def _causal_alibi(self, length: int, dtype, device) -> torch.Tensor:
        """(1, heads, length, length) causal ALiBi bias, kept between training steps (rebuilding it every forward
        costs a few full-size passes); built in sizes rounded up to 256 so it is rebuilt rarely."""
        cached = self._causal_alibi_cache.get((dtype, device))
        if cached is None or cached.shape[-1] < length:
            size = -(-length // 256) * 256
            slopes = torch.tensor(alibi_slopes(self.config.num_attention_heads), device=device)
            positions = torch.arange(size, device=device)
            bias = alibi_bias(slopes, positions, positions, dtype)
            cached = bias.masked_fill(positions[None, :] > positions[:, None], torch.finfo(dtype).min)
            self._causal_alibi_cache = {(dtype, device): cached}
        return cached[:, :, :length, :length]

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        cache = cache_argument(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.training and any(layer.gradient_checkpointing for layer in self.layers):
            use_cache = False  # recomputation would append to the cache twice
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError("the cache must be a transformers Cache (e.g. DynamicCache), not a tuple")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        batch, query_length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        # Under autocast the attention runs in the autocast dtype; build the mask in it so no layer re-casts it.
        mask_dtype = inputs_embeds.dtype
        if torch.is_autocast_enabled(device.type):
            mask_dtype = torch.get_autocast_dtype(device.type)
        # Attention weights exist only in the eager form; asking for them switches this call to it.
        implementation = self.config._attn_implementation
        if kwargs.get("output_attentions", self.config.output_attentions):
            implementation = "eager"

        example_spans = kwargs.pop("example_spans", None)
        if example_spans is not None and cache is None and (
                implementation == "flex_attention" or is_flash_implementation(implementation)):
            # One kernel a layer for the whole micro-batch: the spans as example ids, the 2-D mask form.
            attention_mask, example_spans = span_example_ids(example_spans, batch, query_length, device), None
        if example_spans is not None and cache is None:
            mask, position_ids = self._training_span_inputs(example_spans, position_ids, batch, query_length,
                                                            mask_dtype, device)
            extra = {"example_spans": example_spans}
        else:
            sizes = Sizes.of(cache, batch, query_length)
            example_ids, position_ids = self._examples_and_positions(attention_mask, position_ids, sizes, device)
            mask, extra = self._attention_inputs(implementation, attention_mask, example_ids, sizes, mask_dtype,
                                                 device, caller_varlen=kwargs.get("cu_seq_lens_q") is not None)
        position_embeddings = None
        if self.config.uses_rope:
            position_embeddings = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=use_cache,
                position_ids=position_ids,
                attention_implementation=implementation,
                **extra,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})


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

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs):
        # generate() would pre-build a 4-D mask for static caches without example ids or ALiBi; the forward
        # builds the right one from the 2-D mask itself, with no data-dependent branch. A compiled decoding step
        # must see the same shapes every step, so the mask is padded with 0 (padding) to the cache's fixed length.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if attention_mask is None or attention_mask.dim() != 2 or cache is None:
            return attention_mask
        key_length, _ = cache.get_mask_sizes(inputs_embeds.shape[1], 0)
        return pad_example_ids(attention_mask, key_length)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """``labels`` are unshifted (shifted here); ``shift_labels`` are already aligned with the logits (sequence /
        context parallel training) and win over ``labels``. ``num_items_in_batch`` divides the summed loss."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache_argument(cache, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # the tuple form, if asked for, is made once, here
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = F.linear(hidden_states, self.head_weight())

        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.causal_lm_loss(logits, labels, num_items_in_batch, shift_labels=shift_labels)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def causal_lm_loss(self, logits, labels=None, num_items_in_batch=None, shift_labels=None):
        """Next-token cross entropy (-100 ignored, mean over counted tokens, or sum / num_items_in_batch) plus
        z_loss_weight * mean(max_logit ** 2) over the positions that have a target slot. With ``labels`` the
        last position has none (shifted here); with ``shift_labels`` every position has one."""
        if shift_labels is None:
            scored_logits = logits[:, :-1].float()
            targets = labels[:, 1:]
        else:
            scored_logits = logits.float()
            targets = shift_labels
        targets = targets.to(logits.device)
        total = F.cross_entropy(
            scored_logits.reshape(-1, scored_logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
            reduction="sum",
        )
        if num_items_in_batch is not None:
            count = torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
        else:
            count = (targets != -100).sum().clamp(min=1).to(total.dtype)
        loss = total / count
        if self.config.z_loss_weight and self.config.uses_norm_head:
            loss = loss + self.config.z_loss_weight * scored_logits.max(dim=-1).values.pow(2).mean()
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
        # folder reads like the release and reloads with the same behaviour. auto_map names the copy of this file
        # that save_pretrained puts beside it (never the release's tokenization_baichuan.py, which is not there).
        config_path = os.path.join(str(save_directory), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            config.update(
                tokenizer_class="BaichuanTokenizer",
                add_bos_token=bool(self.add_bos_token),
                add_eos_token=bool(self.add_eos_token),
            )
            config["auto_map"] = {"AutoTokenizer": [f"{code_module_name(type(self))}.BaichuanTokenizer", None]}
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
AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaichuanTokenizer, exist_ok=True)
# save_pretrained then copies this file into the folder and writes auto_map entries naming it, so tools without
# this repository load the folder with trust_remote_code=True.
BaichuanConfig.register_for_auto_class("AutoConfig")
BaichuanModel.register_for_auto_class("AutoModel")
BaichuanForCausalLM.register_for_auto_class("AutoModelForCausalLM")
BaichuanTokenizer.register_for_auto_class("AutoTokenizer")

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
