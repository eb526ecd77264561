"""A folder must never run code, and a run never changes anything outside its own folder.

Folders from someone else: a checkpoint to resume (its pickles), a model or tokenizer folder (its `auto_map`
code), a run folder with symbolic links in it. Each payload here creates a marker file if it runs; every case
must end with no marker, and either one `error:` line and a non-zero exit or a correct result, with nothing that
was on disk lost.
"""
import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import PYTHON, REPO_ROOT, MarkerPayload, assert_one_line_error, snapshot

TRAIN = str(REPO_ROOT / "train_llama2.py")
INFERENCE = str(REPO_ROOT / "inference.py")
PREPARE = str(REPO_ROOT / "prepare_dataset.py")
SAMPLE = str(REPO_ROOT / "data" / "llama2_sample.jsonl")
STEPS = 4
COMMON = ["--block-size", "128", "--batch-size", "4", "--max-steps", str(STEPS), "--save-every", "2",
          "--keep-last", "2", "--lr", "1e-3", "--log-interval", "1", "--num-workers", "0", "--seed", "0"]
STDIN = {"no terminal": dict(stdin=subprocess.DEVNULL), "answers y": dict(input="y\n")}


def run(*args, stdin="no terminal"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([PYTHON, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300, **STDIN[stdin])


def train(tiny_run, save_dir, *flags, model=None, stdin="no terminal"):
    return run(TRAIN, "--model-name-or-path", model or tiny_run["llama"], "--dataset-name-or-path", tiny_run["data"],
               "--save-model-dir", save_dir, *COMMON, *flags, stdin=stdin)


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def one_error_line(result, *words):
    """Exactly one `error:` line, the last one, holding `words`."""
    line = assert_one_line_error(result)
    errors = [text for text in (result.stdout + result.stderr).splitlines() if "error:" in text]
    assert errors == [line], result.stderr[-3000:]
    assert all(word in line for word in words), line
    return line


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: nothing a checkpoint folder holds is unpickled
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_run, tmp_path_factory):
    """A run of STEPS steps with checkpoints at steps 2 and 4."""
    save_dir = tmp_path_factory.mktemp("untrusted") / "run"
    ok(train(tiny_run, save_dir))
    return save_dir


def copy_of(finished_run, folder):
    shutil.copytree(finished_run, folder)
    return folder, folder / "checkpoints" / f"step-{STEPS:08d}"


def fix_checksums(checkpoint):
    """What an attacker does after changing a checkpoint: record the new files' checksums."""
    names = sorted(name for name in os.listdir(checkpoint) if name != "checksums.sha256")
    (checkpoint / "checksums.sha256").write_text(
        "".join(f"{hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()}  {name}\n" for name in names))


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--resume", "--resume-if-possible"])  # the second: a requeued SLURM job
def test_a_metadata_file_that_runs_code_is_refused(tiny_run, finished_run, tmp_path, flag):
    run_dir, newest = copy_of(finished_run, tmp_path / "run")
    marker = tmp_path / "metadata_payload_ran"
    (newest / ".metadata").write_bytes(__import__("pickle").dumps(MarkerPayload(marker)))
    fix_checksums(newest)
    before = snapshot(run_dir)
    result = train(tiny_run, run_dir, flag)
    assert not marker.exists(), "unpickling .metadata ran the payload"
    one_error_line(result, str(newest / ".metadata"))
    assert snapshot(run_dir) == before


def resave_with(checkpoint, marker, key):
    """The checkpoint written again by plain dcp.save with a pickled payload at `key` (a flat DCP name); its
    .metadata is valid, and its checksums are fixed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(checkpoint)).read_metadata()  # our own, untampered checkpoint
    state = {name: torch.zeros(entry.size, dtype=entry.properties.dtype)
             for name, entry in metadata.state_dict_metadata.items() if isinstance(entry, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(checkpoint))
    state[key] = MarkerPayload(marker)
    for name in os.listdir(checkpoint):
        if name == ".metadata" or name.endswith(".distcp"):
            os.remove(checkpoint / name)
    dcp.save(state, checkpoint_id=str(checkpoint))
    fix_checksums(checkpoint)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("key", ["optimizer.param_groups", "model.lm_head.weight"])
def test_a_pickled_entry_in_a_checkpoint_never_runs(tiny_run, finished_run, tmp_path, key):
    run_dir, newest = copy_of(finished_run, tmp_path / "run")
    marker = tmp_path / "entry_payload_ran"
    resave_with(newest, marker, key)
    assert not marker.exists()
    checkpoints_before = snapshot(run_dir / "checkpoints")
    result = train(tiny_run, run_dir, "--resume")
    assert not marker.exists(), f"loading the checkpoint unpickled {key}"
    if key == "optimizer.param_groups":  # never read: the optimiser's settings come from trainer_state.json
        assert "nothing to train" in ok(result).stdout
    else:
        one_error_line(result, key, str(newest))
    assert snapshot(run_dir / "checkpoints") == checkpoints_before


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"{}", b"\x80\x02}q\x00garbage\xff"])
def test_a_damaged_rng_file_is_one_error_line_naming_it(tiny_run, finished_run, tmp_path, content):
    run_dir, newest = copy_of(finished_run, tmp_path / "run")
    rng = next(newest.glob("rng_rank0.*"))
    rng.write_bytes(content)
    fix_checksums(newest)
    before = snapshot(run_dir)
    one_error_line(train(tiny_run, run_dir, "--resume"), str(rng))
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_checkpoint_of_the_pickling_format_is_refused_before_loading(tiny_run, finished_run, tmp_path):
    """A checkpoint without the plain-JSON state this version writes (earlier layouts pickled the optimiser's settings
    inside DCP) is refused before anything in it is loaded."""
    run_dir, newest = copy_of(finished_run, tmp_path / "run")
    state = json.loads((newest / "trainer_state.json").read_text())
    del state["non_tensor_state"]
    (newest / "trainer_state.json").write_text(json.dumps(state))
    fix_checksums(newest)
    before = snapshot(run_dir)
    one_error_line(train(tiny_run, run_dir, "--resume"), str(newest), "not written by this version", "--overwrite")
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------------------------------------
# Run folders: a link is refused or removed, never followed
# ----------------------------------------------------------------------------------------------------------

def outside_folder(tmp_path, name="outside"):
    """A folder of someone else's files that a run must leave alone."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "notes.txt").write_text("someone else's work")
    (folder / "results.json").write_text('{"keep": true}')
    return folder


@pytest.mark.slow
def test_overwrite_never_follows_a_linked_checkpoints_folder(tiny_run, finished_run, tmp_path):
    """The old run's checkpoints live behind a link: --overwrite must not start writing among them (its
    --keep-last would then delete the new run's checkpoints and keep the old ones for --resume)."""
    run_dir, _ = copy_of(finished_run, tmp_path / "run")
    elsewhere = tmp_path / "old_checkpoints"
    shutil.move(run_dir / "checkpoints", elsewhere)
    (run_dir / "checkpoints").symlink_to(elsewhere)
    before, kept = snapshot(run_dir), snapshot(elsewhere)
    one_error_line(train(tiny_run, run_dir, "--overwrite"), str(run_dir / "checkpoints"), "symbolic link")
    assert snapshot(elsewhere) == kept
    assert snapshot(run_dir) == before and (run_dir / "checkpoints").is_symlink()


@pytest.mark.slow
def test_a_linked_final_model_staging_folder_is_removed_not_followed(tiny_run, finished_run, tmp_path):
    """The final model is written to .final_model.partial and moved into place: a link there must not send the
    model into another folder, nor move that folder's files into the run folder."""
    run_dir, _ = copy_of(finished_run, tmp_path / "run")
    (run_dir / "model.safetensors").unlink()
    outside = outside_folder(tmp_path)
    kept = snapshot(outside)
    (run_dir / ".final_model.partial").symlink_to(outside)
    assert "nothing to train" in ok(train(tiny_run, run_dir, "--resume")).stdout
    assert snapshot(outside) == kept
    assert (run_dir / "model.safetensors").is_file() and not (run_dir / ".final_model.partial").exists()
    assert not (run_dir / "notes.txt").exists() and not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_a_linked_adapter_folder_is_named_when_resuming(tiny_run, tmp_path):
    """A LoRA run folder whose adapter/ is a link: the error names adapter/, not the run folder."""
    run_dir = tmp_path / "lora_run"
    ok(train(tiny_run, run_dir, "--lora", "--max-steps", "2"))
    outside = tmp_path / "adapter_elsewhere"
    shutil.move(run_dir / "adapter", outside)
    (run_dir / "adapter").symlink_to(outside)
    before, kept = snapshot(run_dir), snapshot(outside)
    one_error_line(train(tiny_run, run_dir, "--lora", "--max-steps", "2", "--resume"),
                   f"{run_dir / 'adapter'} is a symbolic link")
    assert snapshot(outside) == kept and snapshot(run_dir) == before


STAGED = ["trackers.json.partial", "run_config.json.partial", "metrics.jsonl.tmp", "training_curves.png.partial.png"]


@pytest.mark.slow
def test_links_at_the_staging_names_are_removed_not_followed(tiny_run, finished_run, tmp_path):
    """trackers.json, run_config.json, metrics.jsonl and the picture are each written under a staging name and
    moved into place: a link at that name must not send the write to the file it points to."""
    pytest.importorskip("tensorboard", reason="the optional trackers are not installed (requirements-trackers.txt)")
    run_dir, _ = copy_of(finished_run, tmp_path / "run")
    outside = outside_folder(tmp_path)
    kept = snapshot(outside)
    for name in STAGED:
        (run_dir / name).symlink_to(outside / "notes.txt")
    assert "nothing to train" in ok(train(tiny_run, run_dir, "--resume", "--report-to", "tensorboard")).stdout
    assert snapshot(outside) == kept
    assert not [name for name in STAGED if os.path.lexists(run_dir / name)]
    for name in ("trackers.json", "run_config.json", "metrics.jsonl", "training_curves.png"):
        assert (run_dir / name).is_file() and not (run_dir / name).is_symlink(), name


@pytest.mark.slow
def test_a_linked_tensorboard_folder_is_refused(tiny_run, finished_run, tmp_path):
    pytest.importorskip("tensorboard", reason="the optional trackers are not installed (requirements-trackers.txt)")
    run_dir, _ = copy_of(finished_run, tmp_path / "run")
    outside = outside_folder(tmp_path)
    (run_dir / "tensorboard").symlink_to(outside)
    before, kept = snapshot(run_dir), snapshot(outside)
    one_error_line(train(tiny_run, run_dir, "--resume", "--report-to", "tensorboard"),
                   f"{run_dir / 'tensorboard'} is a symbolic link")
    assert snapshot(outside) == kept and snapshot(run_dir) == before


# ----------------------------------------------------------------------------------------------------------
# Model and tokenizer folders: their own code runs only with --trust-remote-code
# ----------------------------------------------------------------------------------------------------------

FOLDER_CODE = '''
open({marker!r}, "a").close()
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class Config(LlamaConfig):
    model_type = "custom_llama"
class Model(LlamaForCausalLM):
    config_class = Config
class Tokenizer(PreTrainedTokenizerFast):
    pass
'''
# What each folder's auto_map asks for: (config.json changes, tokenizer_config.json changes)
AUTO_MAPS = {
    "config": ({"model_type": "custom_llama",
                "auto_map": {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}}, {}),
    "tokenizer": ({}, {"tokenizer_class": "Tokenizer", "auto_map": {"AutoTokenizer": [None, "custom.Tokenizer"]}}),
    # A model class of its own for a model type transformers knows: its own class wins, the code is not needed.
    "model": ({"auto_map": {"AutoModelForCausalLM": "custom.Model"}}, {}),
}


def update_json(path, changes):
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def folder_with_code(source, folder, marker, config=None, tokenizer=None):
    """A copy of the model folder `source` whose auto_map names its own code, which creates `marker`."""
    shutil.copytree(source, folder)
    (folder / "custom.py").write_text(FOLDER_CODE.format(marker=str(marker)))
    update_json(folder / "config.json", config or {})
    update_json(folder / "tokenizer_config.json", tokenizer or {})
    return folder, marker


@pytest.fixture(scope="module")
def code_folders(tiny_run, tmp_path_factory):
    """name -> (folder, marker): tiny model folders whose own code creates `marker` when it runs. "baichuan" is
    a Baichuan folder as save_pretrained writes it (auto_map to its copy of modeling_baichuan.py), which loads
    with the registered classes and never needs its copy."""
    root = tmp_path_factory.mktemp("code_folders")
    folders = {name: folder_with_code(tiny_run["llama"], root / name, root / f"{name}_code_ran", *changes)
               for name, changes in AUTO_MAPS.items()}
    folder, marker = root / "baichuan", root / "baichuan_code_ran"
    shutil.copytree(tiny_run["baichuan"], folder)
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    for code in folder.glob("*.py"):
        code.write_text(f"open({str(marker)!r}, 'a').close()\n" + code.read_text())
    folders["baichuan"] = folder, marker
    return folders


def infer(folder, *flags, stdin="no terminal"):
    return run(INFERENCE, "--model-dir", folder, "--example", '{"article": "w5 w6 w7"}', "--max-new-tokens", "2",
               *flags, stdin=stdin)


def prepare(folder, save_path, stdin):
    return run(PREPARE, "llama2", "--model-name-or-path", folder, "--dataset-name-or-path", SAMPLE,
               "--save-path", save_path, "--max-examples", "8", stdin=stdin)


def refused_code(result, folder):
    one_error_line(result, str(folder), "ships its own code", "--trust-remote-code")


@pytest.mark.slow
@pytest.mark.parametrize("stdin", list(STDIN))
@pytest.mark.parametrize("kind", ["config", "tokenizer"])
def test_inference_never_runs_a_folders_code(code_folders, kind, stdin):
    folder, marker = code_folders[kind]
    before = snapshot(folder)
    refused_code(infer(folder, stdin=stdin), folder)
    assert not marker.exists(), f"the {kind}'s own code ran"
    assert snapshot(folder) == before


@pytest.mark.slow
@pytest.mark.parametrize("stdin", list(STDIN))
def test_prepare_dataset_never_runs_a_tokenizers_code(code_folders, tmp_path, stdin):
    folder, marker = code_folders["tokenizer"]
    refused_code(prepare(folder, tmp_path / "out", stdin), folder)
    assert not marker.exists(), "the tokenizer's own code ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["config", "tokenizer"])
def test_training_never_runs_a_folders_code_even_when_stdin_says_yes(tiny_run, code_folders, tmp_path, kind):
    folder, marker = code_folders[kind]
    refused_code(train(tiny_run, tmp_path / "run", model=folder, stdin="answers y"), folder)
    assert not marker.exists(), f"the {kind}'s own code ran"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "baichuan"])
def test_folders_that_need_no_code_of_their_own_load_without_running_it(code_folders, kind):
    folder, marker = code_folders[kind]
    ok(infer(folder))
    assert not marker.exists()


@pytest.mark.slow
def test_prepare_dataset_loads_a_tokenizer_beside_a_model_with_code(code_folders, tmp_path):
    """The tokenizer of the "config" folder is an ordinary one: preparing data needs none of the model's code."""
    folder, marker = code_folders["config"]
    ok(prepare(folder, tmp_path / "out", "answers y"))
    assert not marker.exists() and (tmp_path / "out" / "dataset_dict.json").is_file()


@pytest.mark.slow
def test_trust_remote_code_runs_it(tiny_run, tmp_path):
    """The payload is real: with the flag, the folder's code runs (and loads)."""
    folder, marker = folder_with_code(tiny_run["llama"], tmp_path / "trusted", tmp_path / "code_ran",
                                      *AUTO_MAPS["config"])
    ok(infer(folder, "--trust-remote-code"))
    assert marker.exists()
