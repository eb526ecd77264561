"""finetune/config.py: flags to a frozen RunConfig, its to_dict() round trip, fixed_on_resume() and run_config.json."""
import dataclasses
import json

import pytest

import train_llama2
from finetune import config as run_config
from finetune.args import parse_training_args
from finetune.model.lora import LoraSettings

SECTIONS = {"model": run_config.ModelConfig, "data": run_config.DataConfig, "training": run_config.TrainingConfig,
            "optimizer": run_config.OptimizerConfig, "parallel": run_config.ParallelConfig,
            "plan_only": run_config.PlanOnlyConfig, "checkpoint": run_config.CheckpointConfig,
            "logging": run_config.LoggingConfig}


def flags(*argv):
    return parse_training_args("", train_llama2.DEFAULTS, train_llama2.DEMO_DEFAULTS, list(argv))


def configured(*argv):
    return run_config.from_flags(flags(*argv))


ARGV = ["--model-name-or-path", "/models/tiny", "--dataset-name-or-path", "/data/prepared", "--save-model-dir",
        "/runs/one", "--block-size", "512", "--batching", "longest", "--batch-size", "8", "--epochs", "3",
        "--seed", "7", "--lr", "0.001", "--weight-decay", "0.1", "--warmup-ratio", "0.2", "--min-lr-ratio", "0.05",
        "--max-grad-norm", "0.5", "--save-every", "20", "--keep-last", "3", "--log-interval", "5",
        "--micro-batch-size", "2", "--lora", "--lora-rank", "4", "--lora-target-modules", "q_proj,v_proj"]


def test_every_flag_lands_in_its_section():
    args = flags(*ARGV)
    config = run_config.from_flags(args)
    assert config.model == run_config.ModelConfig("/models/tiny", False)
    assert (config.data.dataset_name_or_path, config.data.block_size, config.data.batching) == \
        ("/data/prepared", 512, "longest")
    assert (config.training.batch_size, config.training.epochs, config.training.max_steps, config.training.seed) == \
        (8, 3, None, 7)
    assert config.optimizer == run_config.OptimizerConfig(0.001, 0.1, 0.2, 0.05, 0.5)
    assert config.parallel.micro_batch_size == 2
    assert (config.checkpoint.save_model_dir, config.checkpoint.save_every, config.checkpoint.keep_last) == \
        ("/runs/one", 20, 3)
    assert config.logging.log_interval == 5 and config.logging.report_to == ()
    # The adapter targets are split at the commas; the base they name is the model.
    assert config.lora == LoraSettings(rank=4, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                       targets=("q_proj", "v_proj"), quantize_4bit=False, base="/models/tiny")
    assert config.flags == vars(args) and config.flags is not vars(args)  # a copy, as parsed


def test_full_fine_tuning_has_no_lora_section():
    assert configured("--model-name-or-path", "/m").lora is None


def test_to_dict_round_trips_to_an_equal_config():
    config = configured(*ARGV)
    as_dict = config.to_dict()
    rebuilt = run_config.RunConfig(**{name: cls(**as_dict[name]) for name, cls in SECTIONS.items()},
                                   lora=LoraSettings(**as_dict["lora"]), demo=as_dict["demo"], flags=as_dict["flags"])
    assert rebuilt == config
    assert json.loads(json.dumps(as_dict, default=str))["data"]["block_size"] == 512


def test_the_config_is_frozen():
    config = configured()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1


@pytest.mark.parametrize("batching, pad_to", [("packed", 512), ("block", 512), ("longest", None)])
def test_rows_are_padded_to_the_block_unless_batching_longest(batching, pad_to):
    assert run_config.DataConfig("d", block_size=512, batching=batching).pad_to == pad_to


def test_fixed_on_resume_holds_what_changes_the_run_and_nothing_else():
    base = configured(*ARGV).fixed_on_resume()
    assert base == {"seed": 7, "batch_size": 8, "batching": "longest", "block_size": 512, "lr": 0.001,
                    "warmup_ratio": 0.2, "min_lr_ratio": 0.05, "weight_decay": 0.1, "max_grad_norm": 0.5,
                    "max_steps": None, "epochs": 3}
    # Logging, checkpointing and placement settings may change on resume.
    assert configured(*ARGV, "--log-interval", "1", "--keep-last", "5", "--micro-batch-size", "1",
                      "--num-workers", "0").fixed_on_resume() == base
    assert configured(*ARGV, "--lr", "0.002").fixed_on_resume() != base
    assert configured(*ARGV, "--seed", "8").fixed_on_resume()["seed"] == 8


def test_max_steps_makes_the_epoch_count_irrelevant():
    """--max-steps overrides --epochs, so a resumed run may give other epochs with the same max steps."""
    first = configured(*ARGV, "--max-steps", "40").fixed_on_resume()
    assert first["max_steps"] == 40 and first["epochs"] is None
    assert configured(*ARGV, "--max-steps", "40", "--epochs", "9").fixed_on_resume() == first


def test_run_config_json_holds_the_config_the_extra_record_and_provenance(tmp_path):
    config = configured(*[a if a != "/runs/one" else str(tmp_path) for a in ARGV])
    path = run_config.write_run_config(config, extra={"plan": {"micro_batch_size": 2}})
    assert path == str(tmp_path / run_config.RUN_CONFIG_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_config.RUN_CONFIG_FILE]  # no staging file left
    written = json.loads((tmp_path / run_config.RUN_CONFIG_FILE).read_text())
    expected = json.loads(json.dumps(config.to_dict(), default=str))  # tuples as lists
    assert {key: written[key] for key in expected} == expected
    assert written["plan"] == {"micro_batch_size": 2}
    assert written["library_versions"]["torch"] and "python" in written["library_versions"]
    assert set(written) == set(expected) | {"plan", "library_versions", "git"}
