"""Bad inputs, third round: damaged weight and adapter files, adapter settings on resume, absurd sizes, a broken
memory-plan cache, a broken config.json under --plan-only, and prepare_dataset.py on non-UTF-8 or huge lines.

Each must end in one `error:` line naming the file or flag and a non-zero exit, or give a correct result.
"""
import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script

import train_llama2
from finetune.args import parse_training_args
from finetune.errors import FinetuneError
from finetune.plan import memory, memory_cache, memory_process


def parse_error(*argv):
    """The one-line FinetuneError parse_training_args stops with for the training flags `argv`."""
    with pytest.raises(FinetuneError) as raised:
        parse_training_args("", train_llama2.DEFAULTS, train_llama2.DEMO_DEFAULTS, list(argv))
    message = str(raised.value)
    assert message and "\n" not in message, message
    return message


# ---- absurd sizes are refused at parse time; planning cost stays bounded ----------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--lora", "--lora-rank", str(10 ** 12)], "--lora-rank must be positive and at most 8192"),
    (["--plan-only", "--num-devices", "1000000", "--batch-size", "1000000"], "--num-devices must be from 1 to 8192"),
    (["--plan-only", "--batch-size", str(10 ** 9)], "--batch-size must be from 1 to 1048576"),
    (["--micro-batch-size", str(10 ** 9)], "--micro-batch-size must be from 1 to 1048576"),
])
def test_absurd_sizes_give_one_line_naming_the_flag_and_its_range(argv, expected):
    assert expected in parse_error(*argv)


class RecordingChild:
    """Stands in for the simulation child: every micro-batch fits, and the sizes asked for are recorded."""

    def __init__(self):
        self.asked = []

    def simulate(self, config, job):
        part = {"device_peak": 1, "host_peak": 0, "categories": {"Parameter": 1}}
        self.asked += [micro for micro, _ in job["runs"]]
        return {micro: {"on_device": part, "offloaded": part} for micro, _ in job["runs"]}


def test_a_huge_global_batch_plans_only_micro_batches_of_bounded_size(tmp_path, monkeypatch):
    """A million rows on one device used to simulate micro-batches of up to a million rows (hours)."""
    monkeypatch.setenv("FINETUNE_MEMORY_CACHE", str(tmp_path / "cache"))
    child = RecordingChild()
    monkeypatch.setattr(memory_process, "SimulationChild", lambda: contextlib.nullcontext(child))
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4}
    plan = memory.plan_candidates(config, 1, 2 ** 20, 128, device_memory_gb=80)
    assert child.asked and max(child.asked) * 128 <= memory.MAX_MICRO_BATCH_TOKENS
    assert plan.chosen.micro_batch_size == memory.MAX_MICRO_BATCH_TOKENS // 128
    with pytest.raises(ValueError, match="--micro-batch-size"):
        memory.plan_candidates(config, 1, 2 ** 20, 128, device_memory_gb=80, micro_batch_size=2 ** 20)


# ---- --plan-only reads config.json itself --------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("{not json", "is not valid JSON"), ("", "is empty"), ("  \n", "is empty"), ("[1, 2]", "JSON object, not a list"),
    ('{"model_type": "llama", "vocab_size": 128}', "lacks hidden_size"),
    ('{"hidden_size": 32}', "names no model_type"),
    (b"\xff\xfe{}", "is not valid JSON"),
])
def test_plan_only_names_a_broken_config_json(tmp_path, text, expected):
    from finetune.config import from_flags
    from finetune.distributed.backend import Backend
    from finetune.errors import FinetuneError
    from finetune.plan import layout

    config = tmp_path / "config.json"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = parse_training_args("", train_llama2.DEFAULTS, train_llama2.DEMO_DEFAULTS,
                               ["--plan-only", "--model-name-or-path", str(tmp_path)])
    with pytest.raises(FinetuneError) as raised:
        layout.plan_only(from_flags(args), Backend(engine="single", device=torch.device("cpu")))
    assert str(config) in str(raised.value) and expected in str(raised.value), raised.value


def test_plan_only_with_a_broken_config_json_exits_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    result = run_script(PYTHON, "train_llama2.py", "--plan-only", "--model-name-or-path", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'config.json'} must hold a JSON object, " \
                                                     f"not a list"


# ---- the memory-plan cache (FINETUNE_MEMORY_CACHE) ----------------------------------------------------------

TINY_CONFIG = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4}


def plan_with(cache, monkeypatch, capsys):
    """A small plan through a recording stand-in for the simulation child: (plan, sizes simulated, stderr)."""
    monkeypatch.setenv("FINETUNE_MEMORY_CACHE", str(cache))
    monkeypatch.setattr(memory_cache, "_UNUSABLE_CACHES", set())
    child = RecordingChild()
    monkeypatch.setattr(memory_process, "SimulationChild", lambda: contextlib.nullcontext(child))
    plan = memory.plan_candidates(TINY_CONFIG, 1, 8, 128, device_memory_gb=80, checkpointing=False,
                                  cpu_offload=False)
    return plan, child.asked, capsys.readouterr().err


@pytest.mark.parametrize("damage, problem", [
    (lambda entry: entry.write_text("{}"), "no on_device figures"),
    (lambda entry: entry.write_text("[1, 2]"), "a JSON list"),
    (lambda entry: entry.write_text(entry.read_text()[:20]), "not valid JSON"),
    (lambda entry: entry.write_text(entry.read_text().replace('"device_peak": 1', '"device_peak": -9e290')),
     "device_peak is -9e+290"),
    (lambda entry: entry.write_text(entry.read_text().replace('"device_peak": 1', '"device_peak": NaN')),
     "device_peak is nan"),
    (lambda entry: entry.write_text(entry.read_text().replace('"device_peak": 1', '"device_peak": -1')),
     "device_peak is -1"),
    (lambda entry: (entry.unlink(), entry.mkdir()), "Is a directory"),
], ids=["empty-object", "list", "truncated", "huge-negative-peak", "nan-peak", "negative-peak", "folder"])
def test_a_broken_cache_entry_is_named_once_and_recomputed(tmp_path, monkeypatch, capsys, damage, problem):
    cache = tmp_path / "cache"
    good, asked, _ = plan_with(cache, monkeypatch, capsys)
    entries = sorted(cache.glob("*.json"))
    assert asked == [1, 2, 4, 8] and len(entries) == 4
    damage(entries[0])
    plan, asked, err = plan_with(cache, monkeypatch, capsys)
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and problem in warnings[0], err
    assert warnings[0].startswith(f"warning: memory-plan cache entry {entries[0]} is broken ("), err
    assert asked and plan.chosen.memory == good.chosen.memory
    if entries[0].is_file():  # the fresh reading replaced the broken one: the next plan is quiet and cached
        assert plan_with(cache, monkeypatch, capsys)[1:] == ([], "")


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unusable_cache_location_plans_without_caching_with_one_note(tmp_path, monkeypatch, capsys, where):
    cache = tmp_path / "a_file"
    cache.write_text("not a folder")
    if where == "under a file":
        cache = cache / "cache"
    elif where == "read-only":
        cache = tmp_path / "read_only"
        cache.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(cache)],
                                 capture_output=True)
        if mounted.returncode:
            pytest.skip("cannot mount a read-only file system here")
    try:
        plan, asked, err = plan_with(cache, monkeypatch, capsys)
    finally:
        if where == "read-only":
            subprocess.run(["umount", str(cache)], check=True)
    notes = err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: cannot write the memory-plan cache {cache} ("), err
    assert asked == [1, 2, 4, 8] and plan.chosen.micro_batch_size == 8
    assert (tmp_path / "a_file").read_text() == "not a folder"


# ---- adapter flags on resume ------------------------------------------------------------------------------------

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_run, tmp_path_factory):
    """Command-line flags of a finished two-step --lora run of the tiny Llama, with a checkpoint at step 2."""
    folder = tmp_path_factory.mktemp("lora_resume") / "run"
    argv = [str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path",
            tiny_run["data"], "--block-size", "128", "--batch-size", "4", "--max-steps", "2", "--save-every", "2",
            "--num-workers", "0", "--save-model-dir", str(folder), "--lora", "--lora-target-modules", LORA_TARGETS]
    result = run_script(PYTHON, *argv, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return argv


def test_resume_with_another_lora_dropout_is_refused_naming_the_flag(lora_checkpoint):
    result = run_script(PYTHON, *lora_checkpoint, "--resume", "--lora-dropout", "0.1", env={"OMP_NUM_THREADS": "1"})
    line = assert_one_line_error(result)
    assert line.startswith("error: --lora-dropout differs from the run being resumed") and "dropout 0 " in line, line


def test_resume_with_the_same_targets_in_another_order_is_accepted(lora_checkpoint):
    reordered = ",".join(reversed(LORA_TARGETS.split(",")))
    result = run_script(PYTHON, *lora_checkpoint[:-1], reordered, "--resume", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_checkpoints_of_earlier_versions_compare_what_they_recorded():
    from finetune.model import lora

    earlier = "lora rank 16 alpha 32 on q_proj,v_proj"
    now = lora.LoraSettings(16, 32.0, 0.1, ("v_proj", "q_proj"), False, "base").record()
    assert lora.resume_mismatch(earlier, now) is None  # its dropout was not recorded
    assert lora.resume_mismatch(earlier, dict(now, rank=8))[0] == "--lora-rank"
    assert lora.resume_mismatch(now, None)[0] == "--lora/--qlora"


# ---- damaged weight files: a model folder in training and inference, an adapter folder --------------------------

def inference_error(argv, capsys):
    """The one `error:` line inference.py's main() ends with (printed, exit 1; or a SystemExit message)."""
    import inference

    with pytest.raises(SystemExit) as raised:
        inference.main(argv)
    printed = capsys.readouterr().err.strip().splitlines()
    message = raised.value.code if isinstance(raised.value.code, str) else printed[-1]
    assert raised.value.code and message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in "\n".join(printed)
    return message


def with_bin_weights(source, folder, damage):
    """A copy of the model folder `source` with its weights as a pytorch_model.bin, damaged by `damage`."""
    from safetensors.torch import load_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = folder / "pytorch_model.bin"
    torch.save(load_file(Path(source) / "model.safetensors"), weights)
    weights.write_bytes(damage(weights.read_bytes()))
    return weights


BIN_DAMAGE = {"garbage-in-front": lambda data: b"garbage" + data[:100], "truncated": lambda data: data[:len(data) // 2],
              "empty": lambda data: b""}
EXAMPLE = ["--example", '{"article": "w5 w6"}', "--max-new-tokens", "2"]


@pytest.mark.parametrize("damage", list(BIN_DAMAGE))
def test_a_damaged_bin_model_file_is_named_by_inference(tiny_run, tmp_path, capsys, damage):
    weights = with_bin_weights(tiny_run["llama"], tmp_path / "model", BIN_DAMAGE[damage])
    line = inference_error(["--model-dir", str(tmp_path / "model"), *EXAMPLE], capsys)
    assert f"{weights} is damaged or truncated" in line, line


def test_a_damaged_bin_model_file_is_named_by_training(tiny_run, tmp_path):
    weights = with_bin_weights(tiny_run["llama"], tmp_path / "model", BIN_DAMAGE["garbage-in-front"])
    result = run_script(PYTHON, str(REPO_ROOT / "train_llama2.py"), "--model-name-or-path", str(tmp_path / "model"),
                        "--dataset-name-or-path", tiny_run["data"], "--block-size", "128", "--batch-size", "4",
                        "--max-steps", "1", "--num-workers", "0", "--save-model-dir", str(tmp_path / "out"),
                        env={"OMP_NUM_THREADS": "1"})
    line = assert_one_line_error(result)
    assert f"{weights} is damaged or truncated" in line, line


# ---- inference.py --adapter ---------------------------------------------------------------------------------

def save_adapter(model_dir, folder, targets=("q_proj", "v_proj")):
    """A LoRA adapter of the model in `model_dir`, with non-zero B so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM",
                                      base_model_name_or_path=str(model_dir)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


def other_llama(tiny_run, folder, **changes):
    """The tiny Llama with some config fields changed (another base model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_run["llama"])
    for name, value in changes.items():
        setattr(config, name, value)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    deeper = other_llama(tiny_run, root / "deeper_llama", num_hidden_layers=3)
    wider = other_llama(tiny_run, root / "wider_llama", hidden_size=64, intermediate_size=128)
    return {"good": save_adapter(tiny_run["llama"], root / "good"), "deeper_base": deeper,
            "of_deeper": save_adapter(deeper, root / "of_deeper"), "of_wider": save_adapter(wider, root / "of_wider"),
            "root": root}


def adapter_variant(adapters, folder, config=None, text=None, weights=None):
    """A copy of the good adapter with its config's fields changed (`config`), or replaced (`text`), or its
    weight file's bytes changed (`weights`)."""
    shutil.copytree(adapters["good"], folder)
    config_file = folder / "adapter_config.json"
    if config is not None:
        config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), **config)))
    if text is not None:
        config_file.write_text(text)
    if weights is not None:
        weight_file = folder / "adapter_model.safetensors"
        weight_file.write_bytes(weights(weight_file.read_bytes()))
    return folder


@pytest.mark.parametrize("change, expected", [
    (dict(text="[1, 2]"), "adapter_config.json must hold a JSON object, not a list"),
    (dict(text='{"peft_type": "LORA", "r": 4'), "adapter_config.json is not valid JSON"),
    (dict(config={"peft_type": "NO_SUCH_TYPE"}), "peft_type is 'NO_SUCH_TYPE'"),
    (dict(config={"r": "four"}), "r must be a positive integer, got 'four'"),
    (dict(config={"lora_alpha": float("nan")}), "lora_alpha must be a positive finite number, got nan"),
    (dict(config={"lora_dropout": 2}), "lora_dropout must be at least 0 and below 1"),
    (dict(weights=lambda data: data[:len(data) // 2]), "adapter_model.safetensors is damaged or truncated"),
], ids=["list", "not-json", "unknown-peft-type", "r-a-string", "alpha-nan", "dropout-2", "truncated-weights"])
def test_a_broken_adapter_folder_is_one_line_naming_its_file(tiny_run, adapters, tmp_path, capsys, change, expected):
    folder = adapter_variant(adapters, tmp_path / "adapter", **change)
    line = inference_error(["--model-dir", tiny_run["llama"], "--adapter", str(folder), *EXAMPLE], capsys)
    assert str(folder) in line and expected in line, line


def test_a_damaged_bin_adapter_file_is_named(tiny_run, adapters, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = adapter_variant(adapters, tmp_path / "adapter")
    weights = folder / "adapter_model.bin"
    torch.save(load_file(folder / "adapter_model.safetensors"), weights)
    (folder / "adapter_model.safetensors").unlink()
    weights.write_bytes(b"garbage" + weights.read_bytes()[:100])
    line = inference_error(["--model-dir", tiny_run["llama"], "--adapter", str(folder), *EXAMPLE], capsys)
    assert f"{weights} is damaged or truncated" in line, line


def without_base_name(adapters, name, folder):
    """An adapter whose config names no base, so that only the shapes can tell."""
    shutil.copytree(adapters[name], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=None)))
    return folder


@pytest.mark.parametrize("adapter, base, expected", [
    ("of_deeper", "llama", "was trained on"),  # by its base_model_name_or_path
    ("of_deeper-unnamed", "llama", "adapts model.layers.2.self_attn.q_proj, which --model-dir"),
    ("good-unnamed", "deeper_base", "has no weights for 2 of the layers"),
    ("of_wider-unnamed", "llama", "as 64 -> 32 features, but in --model-dir"),  # head_dim stays 8
])
def test_an_adapter_of_another_base_model_is_refused(tiny_run, adapters, tmp_path, capsys, adapter, base, expected):
    name, _, unnamed = adapter.partition("-")
    folder = without_base_name(adapters, name, tmp_path / "adapter") if unnamed else adapters[name]
    model_dir = tiny_run["llama"] if base == "llama" else str(adapters[base])
    if base != "llama":
        shutil.copy(Path(tiny_run["llama"]) / "tokenizer.json", model_dir)
        shutil.copy(Path(tiny_run["llama"]) / "tokenizer_config.json", model_dir)
    line = inference_error(["--model-dir", model_dir, "--adapter", str(folder), *EXAMPLE], capsys)
    assert expected in line, line


def test_hub_names_are_compared_and_local_copies_of_the_base_pass(tiny_run, tmp_path):
    from finetune.errors import FinetuneError
    from finetune.model.adapter import check_same_base

    with pytest.raises(FinetuneError, match="was trained on meta-llama/Llama-2-7b-hf"):
        check_same_base("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "adapter")
    check_same_base("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-hf", "adapter")
    check_same_base("meta-llama/Llama-2-13b-hf", tiny_run["llama"], "adapter")  # not comparable: shapes decide
    check_same_base(tiny_run["llama"], str(shutil.copytree(tiny_run["llama"], tmp_path / "copy")), "adapter")


def test_a_sound_adapter_still_applies(tiny_run, adapters, capsys):
    import inference

    outputs = []
    for extra in ([], ["--adapter", str(adapters["good"])]):
        assert inference.main(["--model-dir", tiny_run["llama"], *extra, "--max-new-tokens", "8",
                               "--example", '{"article": "w5 w6 w7"}']) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] != outputs[1]


# ---- prepare_dataset.py: encodings and huge lines ---------------------------------------------------------------

def prepare_error(argv):
    import prepare_dataset

    with pytest.raises(SystemExit) as raised:
        prepare_dataset.main(argv)
    message = raised.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def articles(*texts):
    return "".join(json.dumps({"article": text, "highlights": "w21 w22"}, ensure_ascii=False) + "\n"
                   for text in texts)


def test_a_latin1_data_file_is_one_line_naming_it_and_the_place(tiny_run, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(articles("w5 w6", "w7", "w8 café w9").encode("latin-1"))
    line = prepare_error(["llama2", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", str(data),
                          "--save-path", str(tmp_path / "out")])
    assert f"data file {data} is not UTF-8 text (line 3, byte " in line and "save it as UTF-8" in line, line
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part-1.jsonl").write_text(articles("w5"))
    (folder / "part-2.jsonl").write_bytes(articles("naïve w6").encode("latin-1"))
    line = prepare_error(["llama2", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", str(folder),
                          "--save-path", str(tmp_path / "out")])
    assert f"data file {folder / 'part-2.jsonl'} is not UTF-8 text (line 1" in line, line
    assert not (tmp_path / "out").exists()


def test_a_line_past_the_limit_is_refused_before_reading(tiny_run, tmp_path, monkeypatch):
    from finetune.data import raw_data

    monkeypatch.setattr(raw_data, "MAX_LINE_BYTES", 2 ** 20)
    monkeypatch.setattr(raw_data, "SCAN_CHUNK_BYTES", 2 ** 16)  # the long line spans many chunks
    data = tmp_path / "long.jsonl"
    data.write_text(articles("w5", " ".join(["w6"] * 2 ** 19), "w7"))
    line = prepare_error(["llama2", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", str(data),
                          "--save-path", str(tmp_path / "out")])
    assert line.startswith(f"error: line 2 of data file {data} is over 1 MB"), line


def test_cutting_a_long_text_before_tokenizing_changes_no_kept_token(tiny_run):
    from transformers import AutoTokenizer

    import prepare_dataset
    from finetune.data import preparation

    tokenizer = AutoTokenizer.from_pretrained(tiny_run["llama"])
    long_text = " ".join(f"w{5 + i % 100}" for i in range(20_000))
    batch = {"article": [long_text, "w5 w6"], "highlights": ["w21 w22", " ".join(["w23"] * 5000)]}
    build = prepare_dataset.RECIPES["llama2"]["build_prompt"]
    assert preparation.text_budget(tokenizer, 128) < len(long_text)
    cut = preparation.tokenize_examples(batch, build, tokenizer, 128)
    whole = preparation.tokenize_examples(batch, build, tokenizer, 128, char_budget=10 ** 9)
    assert cut == whole and cut["stat_response_cut"] == [False, True]


# Runs a command and prints its peak resident memory in KiB (ru_maxrss of its only child) as the last line.
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def test_a_64_mb_line_is_prepared_within_bounded_memory(tiny_run, tmp_path):
    """The article used to be tokenized whole (16M tokens) before being cut to the block: 10.6 GB at the peak.
    Now about 0.9 GB, most of it the JSON reader's (a cold datasets cache: the conversion is measured too)."""
    data = tmp_path / "huge.jsonl"
    with open(data, "w") as f:
        f.write(articles(" ".join(f"w{5 + i % 90}" for i in range(2 ** 24)), "w5 w6", "w7", "w8"))
    assert data.stat().st_size > 63 * 2 ** 20
    result = run_script(PYTHON, "-c", PEAK_RSS, PYTHON, "prepare_dataset.py", "llama2", "--model-name-or-path",
                        tiny_run["llama"], "--dataset-name-or-path", str(data), "--save-path", str(tmp_path / "out"),
                        "--validation-fraction", "0", env={"HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
                                                           "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_gib = int(result.stdout.strip().splitlines()[-1]) / 2 ** 20
    assert peak_gib < 2, f"peak resident memory {peak_gib:.2f} GiB"
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())["splits"]["train"]
    assert report["examples"] == 4 and report["prompt_truncated"] == 1 and report["length_max"] == 1024
