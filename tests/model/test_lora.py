"""LoRA and QLoRA (--lora / --qlora): the flags, the memory plan, adapters on one process and on two, small
checkpoints that resume bit for bit, and the outputs users load (a merged model and a peft adapter)."""
import json
import shutil

import pytest
import torch
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script, torchrun
from safetensors.torch import load_file

from finetune.config import DataConfig, ModelConfig
from finetune.data import batches
from finetune.distributed.backend import Backend
from finetune.errors import FinetuneError
from finetune.model import lora, size
from finetune.model.loading import load_model

TRAIN = {"llama": REPO_ROOT / "train_llama2.py", "baichuan": REPO_ROOT / "train_baichuan2_13b.py"}
# A small learning rate: the first updates of LoRA's A matrices see gradients near zero (B starts at zero),
# where AdamW's normalisation magnifies summation-order differences between one process and two.
COMMON = ["--block-size", "128", "--batch-size", "8", "--max-steps", "4", "--lr", "1e-3", "--log-interval", "1",
          "--seed", "0", "--num-workers", "0", "--save-every", "2"]
ENV = {"OMP_NUM_THREADS": "1"}
CPU = Backend(engine="single", device=torch.device("cpu"))


def train(kind, tiny_run, out, *extra, nproc=1):
    args = ["--model-name-or-path", tiny_run[kind], "--dataset-name-or-path", tiny_run["data"],
            "--save-model-dir", str(out), *COMMON, *extra]
    if nproc > 1:
        result = torchrun(nproc, TRAIN[kind], *args, env=ENV)
    else:
        result = run_script(PYTHON, str(TRAIN[kind]), *args, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metric_rows(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def checkpoint_keys(path):
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def peft_merge(base_path, adapter_dir, dtype):
    """What a user gets from peft itself: the base with the saved adapter, merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import modeling_baichuan  # noqa: F401

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict()


def assert_same_tensors(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def lora_settings(tiny_run, kind, targets, quantize=False):
    return lora.LoraSettings(rank=4, alpha=8, dropout=0.0, targets=tuple(targets), quantize_4bit=quantize,
                             base=tiny_run[kind])


# ----------------------------------------------------------------------------------------------------------
# Flags and the plan
# ----------------------------------------------------------------------------------------------------------

def test_lora_flags_defaults_per_model_and_bad_values():
    import train_baichuan2_13b
    import train_llama2
    from finetune.args import parse_training_args
    from finetune.config import from_flags

    def parse(script, *argv):
        return parse_training_args("", script.DEFAULTS, script.DEMO_DEFAULTS, list(argv))

    def adapters(args):
        return from_flags(args).lora

    args = parse(train_llama2, "--lora")
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout, args.lr) == (16, 32.0, 0.0, 2e-4)
    assert parse(train_llama2, "--lora", "--lr", "1e-3").lr == 1e-3 and parse(train_llama2).lr == 1e-5
    assert args.lora_target_modules == "auto"  # the model's own decoder linear layers, found when it loads
    assert adapters(args).quantize_4bit is False
    args = parse(train_baichuan2_13b, "--qlora", "--lora-target-modules", "W_pack, o_proj", "--lora-rank", "8")
    assert args.lora and adapters(args).quantize_4bit and args.lora_target_modules == "W_pack,o_proj"
    assert parse(train_baichuan2_13b, "--lora").lora_target_modules == "auto"
    assert adapters(parse(train_llama2)) is None

    for argv, message in [(("--lora-rank", "8"), "--lora-rank needs --lora or --qlora"),
                          (("--lora", "--lora-rank", "0"), "--lora-rank must be positive"),
                          (("--lora", "--lora-alpha", "nan"), "--lora-alpha must be a positive number"),
                          (("--qlora", "--lora-dropout", "1"), "--lora-dropout must be at least 0 and below 1"),
                          (("--lora", "--lora-target-modules", "q_proj,,v_proj"), "distinct layer names"),
                          (("--lora", "--lora-target-modules", "q_proj,q_proj"), "distinct layer names"),
                          (("--lora", "--lora-target-modules", "auto,q_proj"), "auto stands alone")]:
        with pytest.raises(FinetuneError, match=message):
            parse(train_llama2, *argv)


def test_unknown_target_module_and_qlora_under_torchrun_are_refused(tiny_run):
    from transformers import AutoModelForCausalLM

    with pytest.raises(FinetuneError, match=r"names \['W_pack'\], not linear layers .*q_proj"):
        load_model(CPU, AutoModelForCausalLM, ModelConfig(tiny_run["llama"]),
                            adapters=lora_settings(tiny_run, "llama", ["q_proj", "W_pack"]))
    sharded = Backend(engine="fsdp2", device=torch.device("cpu"), world_size=2)
    with pytest.raises(FinetuneError, match="--qlora runs on one device"):
        load_model(sharded, AutoModelForCausalLM, ModelConfig(tiny_run["llama"]),
                            adapters=lora_settings(tiny_run, "llama", ["q_proj"], quantize=True))


def test_lora_flops_leave_out_weight_gradients_of_the_frozen_base(tiny_run):
    from transformers import AutoConfig

    from finetune.observe.metrics import step_flops

    config = AutoConfig.from_pretrained(tiny_run["llama"])
    weights = 1000
    assert step_flops(config, weights, 10, 0) == 6 * weights * 10
    assert step_flops(config, weights, 10, 0, adapter_parameters=7) == (4 * weights + 6 * 7) * 10


@pytest.mark.parametrize("kind, targets", [("llama", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
                                           ("baichuan", "W_pack,o_proj,gate_proj,up_proj,down_proj"),
                                           ("baichuan", "auto"), ("llama", "q_proj,v_proj")])
def test_planned_adapter_size_matches_peft(tiny_run, kind, targets):
    from transformers import AutoConfig, AutoModelForCausalLM

    import modeling_baichuan  # noqa: F401

    config = AutoConfig.from_pretrained(tiny_run[kind])
    with torch.device("meta"):
        model = lora.add_adapters(AutoModelForCausalLM.from_config(config),
                                  lora_settings(tiny_run, kind, targets.split(",")))
    assert lora.count_trainable(model) == lora.adapter_parameters(size.meta_model(config.to_dict()), 4,
                                                                  targets.split(","))
    assert lora.count_trainable(model) > 0


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_llama2", "train_baichuan2_13b"])
def test_plan_only_fits_13b_on_one_gpu(script, capsys):
    import importlib

    main = importlib.import_module(script).main

    def plan_lines(*argv):
        assert main(["--plan-only", *argv]) == 0
        return dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines()
                    if line.startswith("  ") and not line.startswith("    ") and ": " in line)

    full = plan_lines("--device-memory-gb", "80", "--cpu-offload", "off")
    with_lora = plan_lines("--lora", "--device-memory-gb", "80", "--cpu-offload", "off")
    lora_24 = plan_lines("--lora", "--device-memory-gb", "24", "--cpu-offload", "off")
    qlora = plan_lines("--qlora", "--device-memory-gb", "24", "--cpu-offload", "off")
    assert full["fits"] == "false" and with_lora["fits"] == "true" and qlora["fits"] == "true"
    assert lora_24["fits"] == "false"  # a 13B bf16 base alone is ~24 GiB
    assert with_lora["training"] == "lora" and qlora["training"] == "qlora"
    params, trainable = int(qlora["parameters"]), int(qlora["trainable_parameters"])
    assert 13e9 < params < 14e9 and 0 < trainable < params / 100
    memory = json.loads(qlora["memory_breakdown_gib"])
    # The 4-bit base: about half a byte for each decoder-layer parameter plus bf16 embeddings and head.
    assert 5 < memory["parameters"] < 10 and float(qlora["memory_gib_per_device"]) < 24 * 0.92
    with pytest.raises(SystemExit, match="--qlora runs on one device"):
        main(["--plan-only", "--qlora", "--num-devices", "2"])


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tiny_run):
    out = tiny_run["root"] / "lora_single"
    train("llama", tiny_run, out, "--lora")
    return out


@pytest.mark.slow
def test_lora_two_processes_match_one_process(tiny_run, lora_run):
    double = tiny_run["root"] / "lora_double"
    train("llama", tiny_run, double, "--lora", nproc=2)
    rows_1, rows_2 = metric_rows(lora_run), metric_rows(double)
    assert [r["loss"] for r in rows_1] == pytest.approx([r["loss"] for r in rows_2], abs=1e-5)
    assert [r["tokens"] for r in rows_1] == [r["tokens"] for r in rows_2] and len(rows_1) == 4
    assert_same_tensors(load_file(f"{lora_run}/adapter/adapter_model.safetensors"),
                        load_file(f"{double}/adapter/adapter_model.safetensors"), atol=1e-5)
    assert_same_tensors(load_file(f"{lora_run}/model.safetensors"), load_file(f"{double}/model.safetensors"),
                        atol=1e-5)


@pytest.mark.slow
def test_lora_outputs_merged_model_and_adapter_and_small_checkpoints(tiny_run, lora_run):
    from transformers import AutoModelForCausalLM

    import train_llama2
    from finetune.ops.chunked_loss import use_token_loss
    from finetune.training import Validation

    adapter_config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_run["llama"] and adapter_config["r"] == 16
    merged = load_file(f"{lora_run}/model.safetensors")
    base = load_file(f"{tiny_run['llama']}/model.safetensors")
    assert merged.keys() == base.keys()  # a plain model: no adapter weights, loadable without peft
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    assert_same_tensors(peft_merge(tiny_run["llama"], lora_run / "adapter", torch.float32),
                        merged)

    # The merged model is the model that trained: its validation loss is the run's last one.
    model = AutoModelForCausalLM.from_pretrained(str(lora_run), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    use_token_loss(model, None)  # as load_model does: the script's forward passes its token_loss to the model
    data_config = DataConfig(tiny_run["data"], block_size=128)
    _, table = batches.load_token_tables(data_config)
    rows = batches.validation_rows(table, data_config, 0)
    val = Validation(table, rows, train_llama2.forward, CPU, batches.BatchFormat(8, 2, None)).loss(model)
    assert val == pytest.approx(metric_rows(lora_run)[-1]["val_loss"], abs=1e-5)

    # Checkpoints hold the adapters and their optimiser state, none of the frozen base.
    keys = checkpoint_keys(lora_run / "checkpoints" / "step-00000004")
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert all(".lora_" in k for k in keys if k.startswith("optimizer.state."))


def resume_from_step_2(script, reference, resumed, *args, other_adapters=None):
    """Resume a copy of `reference` from its step-2 checkpoint (as if stopped there); it must end bit for bit
    where the uninterrupted run did. A try with `other_adapters` flags first must be refused, leaving all."""
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    if other_adapters:
        refused = run_script(PYTHON, str(script), *args, *other_adapters, "--save-model-dir", str(resumed), "--resume",
                             env=ENV)
        assert "it has lora rank 16" in assert_one_line_error(refused)
        assert (resumed / "checkpoints" / "step-00000002" / ".metadata").is_file()
    result = run_script(PYTHON, str(script), *args, "--save-model-dir", str(resumed), "--resume", env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stdout
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert_same_tensors(load_file(str(reference / name)), load_file(str(resumed / name)))
    strip = lambda rows: [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in rows]  # noqa: E731
    assert strip(metric_rows(resumed)) == strip(metric_rows(reference))


@pytest.mark.slow
def test_llama_lora_resumes_bit_for_bit(tiny_run, lora_run, tmp_path):
    resume_from_step_2(TRAIN["llama"], lora_run, tmp_path / "resumed", "--model-name-or-path", tiny_run["llama"],
                       "--dataset-name-or-path", tiny_run["data"], *COMMON, "--lora",
                       other_adapters=["--lora-rank", "8"])


@pytest.mark.slow
def test_baichuan_demo_lora_resumes_bit_for_bit(tmp_path, capsys):
    # The same demo rows as test_training's demo run, so the prepared demo data is shared.
    args = ["--demo", "--lora", "--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--block-size", "512",
            "--num-workers", "0"]
    reference = tmp_path / "reference"
    result = run_script(PYTHON, str(TRAIN["baichuan"]), *args, "--save-model-dir", str(reference), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    resume_from_step_2(TRAIN["baichuan"], reference, tmp_path / "resumed", *args)

    # inference.py: the merged folder alone, or the base plus --adapter, continue the prompt the same way.
    import inference

    base = json.loads((reference / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    outputs = []
    for extra in (["--model-dir", str(reference)], ["--model-dir", base, "--adapter", str(reference / "adapter")]):
        assert inference.main([*extra, "--recipe", "baichuan2", "--max-new-tokens", "6"]) == 0
        outputs.append(capsys.readouterr().out.split("--- greedy ---")[1].split("--- sampled ---")[0])
    assert outputs[0] == outputs[1]


# ----------------------------------------------------------------------------------------------------------
# QLoRA (bitsandbytes 4-bit runs on this CPU)
# ----------------------------------------------------------------------------------------------------------

def test_qlora_validation_pass_leaves_the_training_gradients_alone(tiny_run):
    """bitsandbytes repacks 4-bit CPU layers for inference on the first eval forward; training after that must
    still send gradients through the base."""
    from transformers import AutoModelForCausalLM

    model = load_model(CPU, AutoModelForCausalLM, ModelConfig(tiny_run["llama"]),
                                adapters=lora_settings(tiny_run, "llama", ["q_proj", "down_proj"], quantize=True))
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 32))
    for name, p in model.named_parameters():  # non-zero B, so every adapter gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)

    def gradients():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    assert_same_tensors(before, gradients())


@pytest.mark.slow
def test_qlora_trains_and_saves_adapter_and_bf16_merge(tiny_run):
    out = tiny_run["root"] / "qlora"
    train("baichuan", tiny_run, out, "--qlora", "--lr", "1e-2")
    rows = metric_rows(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    merged = load_file(f"{out}/model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert_same_tensors(peft_merge(tiny_run["baichuan"], out / "adapter", torch.bfloat16), merged)
    keys = checkpoint_keys(out / "checkpoints" / "step-00000004")
    assert all(".lora_" in k for k in keys if k.startswith("model."))  # no 4-bit weights or quantisation state
