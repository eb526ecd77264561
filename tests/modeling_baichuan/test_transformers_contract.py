"""What transformers' own common model tests check, for both Baichuan variants (ALiBi 13B-style, rotary 7B-style).

transformers runs `ConfigTester.run_common_tests`, `test_sdpa_padding_matches_padding_free_with_position_ids` and
`test_generate_compile_model_forward_fullgraph` (tests/test_configuration_common.py, tests/test_modeling_common.py and
tests/causal_lm_tester.py in its repository, not in the wheel) on every causal LM. These are our own versions of
the same checks, on the same tiny sizes as transformers' CausalLMModelTester.
"""

import json

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoConfig, CompileConfig

import modeling_baichuan as mb

# CausalLMModelTester's sizes (silu: the only activation Baichuan has).
TESTER_SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                    max_position_embeddings=512, initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VARIANTS = ["alibi", "rope"]
# ConfigTester builds the config from these keywords: the release defaults (13B, ALiBi) and the 7B (rotary) sizes.
CONFIG_INPUTS = {
    "alibi": {},
    "rope": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}
BF16_EPS = torch.finfo(torch.bfloat16).eps  # transformers' tolerance for padded vs padding-free logits


def tiny_config(variant, **overrides):
    return mb.BaichuanConfig(**TESTER_SIZES, position_embedding=variant, norm_head=True, **overrides)


# ------------------------------------------------------------------------------------------------------------
# test_config: ConfigTester.run_common_tests
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trips_exactly(variant, tmp_path):
    inputs = CONFIG_INPUTS[variant]
    first = mb.BaichuanConfig(**inputs)
    assert first.position_embedding == variant

    written = json.loads(first.to_json_string())
    assert {key: written[key] for key in inputs} == inputs

    first.to_json_file(tmp_path / "config.json")
    assert mb.BaichuanConfig.from_json_file(tmp_path / "config.json").to_dict() == first.to_dict()

    first.save_pretrained(tmp_path / "saved")
    assert mb.BaichuanConfig.from_pretrained(tmp_path / "saved").to_dict() == first.to_dict()
    with pytest.raises(OSError):
        mb.BaichuanConfig.from_pretrained(f".{tmp_path / 'saved'}")

    first.save_pretrained(tmp_path / "outer" / "sub")
    assert mb.BaichuanConfig.from_pretrained(tmp_path / "outer", subfolder="sub").to_dict() == first.to_dict()

    # AutoConfig records the folder it read (name_or_path), for every model; nothing else may change.
    by_auto = AutoConfig.from_pretrained(tmp_path / "saved").to_dict()
    assert by_auto.pop("_name_or_path") == str(tmp_path / "saved")
    expected = first.to_dict()
    expected.pop("_name_or_path")
    assert by_auto == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_common_properties_labels_and_common_arguments(variant):
    inputs = CONFIG_INPUTS[variant]
    config = mb.BaichuanConfig(**inputs)
    # transformers probes the properties with values 0, 1, 2, 3; Baichuan refuses a width of 0, so the probe
    # values here are the smallest ones a Baichuan config accepts.
    probes = {"hidden_size": 80, "num_attention_heads": 1, "num_hidden_layers": 2, "vocab_size": 3}
    for name, value in probes.items():
        setattr(config, name, value)
        assert getattr(config, name) == value
    for name, value in probes.items():
        assert getattr(mb.BaichuanConfig(**{name: value}), name) == value

    labelled = mb.BaichuanConfig(**inputs, num_labels=5)
    assert len(labelled.id2label) == len(labelled.label2id) == 5
    labelled.num_labels = 3
    assert len(labelled.id2label) == len(labelled.label2id) == 3

    assert mb.BaichuanConfig() is not None

    common = dict(return_dict=False, output_hidden_states=True, dtype="float16", tie_word_embeddings=False,
                  chunk_size_feed_forward=5, architectures=["BertModel"], id2label={0: "label"},
                  label2id={"label": "0"}, problem_type="regression", bos_token_id=6, pad_token_id=7, eos_token_id=8)
    config = mb.BaichuanConfig(**inputs, **common)
    assert config.dtype == torch.float16
    assert {key: getattr(config, key) for key in common if key != "dtype"} == {
        key: value for key, value in common.items() if key != "dtype"}


# ------------------------------------------------------------------------------------------------------------
# test_{sdpa,eager}_padding_matches_padding_free_with_position_ids
# ------------------------------------------------------------------------------------------------------------


def padded_and_packed_inputs(side, seed):
    """13 rows of 7 ids, row i holding i + 1 tokens (padding at the `side` end), and the same tokens as one packed
    row with positions restarting at each example, as transformers builds them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (13, 7), generator=generator)
    mask = torch.tril(torch.ones_like(ids))
    if side == "left":
        mask = mask.flip(1)
    ids[mask == 0] = 0
    packed = ids[mask.bool()][None]
    positions = torch.cat([torch.arange(n) for n in mask.sum(1).tolist()])[None]
    return ids, mask, packed, positions


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_logits_match_padding_free_logits(variant, dtype, implementation, tmp_path):
    torch.manual_seed(0)
    mb.BaichuanForCausalLM(tiny_config(variant)).save_pretrained(tmp_path)
    model = mb.BaichuanForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation=implementation).eval()
    for seed in range(3):
        for side in ("right", "left"):
            ids, mask, packed, positions = padded_and_packed_inputs(side, seed)
            with torch.no_grad():
                padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
                padding_free = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
            torch.testing.assert_close(padded, padding_free, rtol=BF16_EPS, atol=BF16_EPS,
                                       msg=lambda m: f"{side} padding, seed {seed}: {m}")


# ------------------------------------------------------------------------------------------------------------
# test_generate_compile_model_forward_fullgraph
# ------------------------------------------------------------------------------------------------------------


def same_greedy_output(first, second, atol=1e-4):
    """Equal sequences, or scores that agree up to and including the first step where they part (a near tie)."""
    if torch.equal(first.sequences, second.sequences):
        return True
    prompt_length = first.sequences.shape[1] - len(first.scores)
    differs = (first.sequences[:, prompt_length:] != second.sequences[:, prompt_length:]).any(dim=0)
    last = int(differs.nonzero()[0])
    return all(torch.allclose(a, b, atol=atol) for a, b in zip(first.scores[:last + 1], second.scores[:last + 1]))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_static_cache_compiles_forward_as_one_graph(variant):
    torch.manual_seed(0)
    model = mb.BaichuanForCausalLM(tiny_config(variant)).eval()
    prompts = torch.randint(3, 99, (4, 7), generator=torch.Generator().manual_seed(1))
    batches = []
    for padding in ([0, 2, 1, 3], [3, 0, 0, 1]):  # two batches of one shape: the second must reuse the graph
        mask = (torch.arange(7)[None, :] >= torch.tensor(padding)[:, None]).long()
        batches.append(dict(input_ids=prompts.masked_fill(mask == 0, 0), attention_mask=mask))
        prompts = prompts.flip(0)
    settings = dict(do_sample=False, max_new_tokens=5, return_dict_in_generate=True, output_scores=True,
                    pad_token_id=0, eos_token_id=None)

    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # compile on the CPU too, as transformers' test does
    model.generation_config.compile_config = compile_config
    torch.compiler.reset()
    counters.clear()
    for batch in batches:
        dynamic = model.generate(**batch, **settings)
        with torch.compiler.set_stance("force_eager"):
            static = model.generate(**batch, **settings, cache_implementation="static")
        compiled = model.generate(**batch, **settings, cache_implementation="static")
        assert same_greedy_output(static, dynamic)
        assert same_greedy_output(compiled, static)
    # decoding steps and both batches ran one compiled forward (fullgraph=True raises on any graph break)
    assert counters["stats"]["unique_graphs"] == 1
    torch.compiler.reset()  # leave no compiled graphs to later tests


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_static_cache_generation_without_padding_equals_dynamic(variant, implementation):
    """Decoding against a static cache must not attend to its not-yet-written slots (no padding, so no mask)."""
    torch.manual_seed(0)
    model = mb.BaichuanForCausalLM(tiny_config(variant)).eval()
    model.set_attn_implementation(implementation)
    prompts = torch.randint(3, 99, (4, 7), generator=torch.Generator().manual_seed(2))
    settings = dict(do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                    output_scores=True)
    for mask in (None, torch.ones_like(prompts)):
        dynamic = model.generate(prompts, attention_mask=mask, **settings)
        static = model.generate(prompts, attention_mask=mask, cache_implementation="static", **settings)
        assert torch.equal(static.sequences, dynamic.sequences)
        for step, (a, b) in enumerate(zip(static.scores, dynamic.scores)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
