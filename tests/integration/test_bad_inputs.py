"""Bad inputs to the training scripts: one `error:` line, no traceback, a non-zero exit, and nothing on disk lost.

Each case gets its own folder, set up before the run; every file under it (and under the shared tiny model and
dataset folders) must be byte for byte the same afterwards. The cases run two at a time to keep the file fast.
"""
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script, snapshot

LLAMA = str(REPO_ROOT / "train_llama2.py")
BAICHUAN = str(REPO_ROOT / "train_baichuan2_13b.py")
ENV = {"OMP_NUM_THREADS": "1"}


def args_for(tiny, folder, model="llama", **flags):
    """A small valid command line, with `flags` (python names, None to drop a flag) changed."""
    values = {"model_name_or_path": tiny[model], "dataset_name_or_path": tiny["data"], "block_size": 128,
              "batch_size": 4, "max_steps": 2, "num_workers": 0, "save_model_dir": folder / "out"}
    values.update(flags)
    out = []
    for name, value in values.items():
        if value is True:
            out.append("--" + name.replace("_", "-"))
        elif value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


# ---- what a case finds on disk before it runs ----------------------------------------------------------------

def nothing(tiny, folder, run):
    pass


def not_a_dataset(tiny, folder, run):
    (folder / "notdata").mkdir()
    (folder / "notdata" / "readme.txt").write_text("just some notes")


def user_files(tiny, folder, run):
    (folder / "out").mkdir()
    (folder / "out" / "thesis.tex").write_text("months of work")


def earlier_run(tiny, folder, run):
    shutil.copytree(run, folder / "out")


def truncated_shard(tiny, folder, run):
    earlier_run(tiny, folder, run)
    shard = next((folder / "out" / "checkpoints" / "step-00000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def garbled_trainer_state(tiny, folder, run):
    earlier_run(tiny, folder, run)
    (folder / "out" / "checkpoints" / "step-00000002" / "trainer_state.json").write_text('{"step": 2, "sched')


def missing_metadata(tiny, folder, run):
    earlier_run(tiny, folder, run)
    (folder / "out" / "checkpoints" / "step-00000002" / ".metadata").unlink()


def only_a_partial_checkpoint(tiny, folder, run):
    earlier_run(tiny, folder, run)
    checkpoints = folder / "out" / "checkpoints"
    (checkpoints / "step-00000002").rename(checkpoints / "step-00000002.partial")


# (id, script, setup, flags, words the error line must hold)
CASES = [
    ("missing-dataset", LLAMA, nothing, dict(dataset_name_or_path="{folder}/no_such_dataset"), ["not found"]),
    ("not-a-dataset", LLAMA, not_a_dataset, dict(dataset_name_or_path="{folder}/notdata"), ["prepare_dataset.py"]),
    ("block-size-0", LLAMA, nothing, dict(block_size=0), ["--block-size"]),
    ("batch-size-0", LLAMA, nothing, dict(batch_size=0), ["--batch-size"]),
    ("negative-lr", LLAMA, nothing, dict(lr=-1e-3), ["--lr"]),
    ("dataset-smaller-than-a-batch", LLAMA, nothing, dict(batch_size=1000), ["--batch-size"]),
    ("examples-longer-than-block", LLAMA, nothing, dict(block_size=32), ["longer than --block-size 32"]),
    ("micro-batch-not-dividing", LLAMA, nothing, dict(micro_batch_size=3), ["--micro-batch-size 3"]),
    ("save-dir-with-user-files", LLAMA, user_files, {}, ["did not write"]),
    ("earlier-run-without-resume", LLAMA, earlier_run, {}, ["--resume", "--overwrite"]),
    ("resume-nothing-there", LLAMA, nothing, dict(resume=True), ["no complete checkpoint"]),
    ("resume-only-partial", LLAMA, only_a_partial_checkpoint, dict(resume=True), ["no complete checkpoint"]),
    ("resume-truncated-shard", LLAMA, truncated_shard, dict(resume=True), ["corrupt"]),
    ("resume-missing-metadata", LLAMA, missing_metadata, dict(resume=True), ["corrupt"]),
    ("resume-garbled-trainer-state", LLAMA, garbled_trainer_state, dict(resume=True),
     ["corrupt", "trainer_state.json"]),
    ("resume-other-llama-size", LLAMA, earlier_run, dict(resume=True, model_name_or_path="{bigger_llama}"),
     ["another model"]),
    ("baichuan-resume-llama-checkpoint", BAICHUAN, earlier_run, dict(resume=True, model="baichuan"),
     ["another model"]),
    ("baichuan-block-beyond-model-length", BAICHUAN, nothing, dict(model="baichuan", block_size=1024),
     ["exceeds"]),
    ("resume-with-another-batch-size", LLAMA, earlier_run, dict(resume=True, batch_size=8), ["--batch-size"]),
    ("hub-model-while-offline", LLAMA, nothing, dict(model_name_or_path="no-such-org/no-such-model"),
     ["no-such-org/no-such-model"]),
    ("missing-model-folder", BAICHUAN, nothing, dict(model="baichuan", model_name_or_path="{folder}/no_model"),
     ["no_model"]),
]


@pytest.fixture(scope="module")
def earlier_run_folder(tiny_run, tmp_path_factory):
    """A run folder of ours holding one complete checkpoint (step 2) of the tiny Llama, written in-process."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import training
    from finetune.checkpoint import checkpointer, run_folder
    from finetune.distributed.backend import Backend

    folder = tmp_path_factory.mktemp("earlier") / "run"
    model = AutoModelForCausalLM.from_pretrained(tiny_run["llama"], dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = training.warmup_cosine_schedule(optim, 10, 0.03, 0.1)
    run_folder.start_run_dir(str(folder), "train_llama2.py")
    # The settings a run of args_for()'s flags records, as the scripts' Checkpointer records them.
    import train_llama2
    from finetune.args import parse_run_config

    config = parse_run_config("", train_llama2.DEFAULTS, train_llama2.DEMO_DEFAULTS, None,
                              args_for(tiny_run, folder.parent))
    from finetune.checkpoint import run_record
    from finetune.data.batches import load_token_tables

    train_table, _ = load_token_tables(config.data)
    settings = dict(config.fixed_on_resume(), adapters=None, epoch=0,
                    dataset=run_record.dataset_fingerprint(train_table.lengths))
    checkpointer.save_checkpoint(str(folder), 2, model, optim, scheduler, settings,
                                  Backend(engine="single", device=torch.device("cpu")), 2)
    return folder


@pytest.fixture(scope="module")
def bigger_llama(tiny_run, tmp_path_factory):
    """The tiny Llama with one more layer: same model type, different shape."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("bigger") / "llama"
    config = LlamaConfig.from_pretrained(tiny_run["llama"])
    config.num_hidden_layers += 1
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_run["llama"]).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def outcomes(tiny_run, earlier_run_folder, bigger_llama, tmp_path_factory):
    """Run every case (two at a time); per case: the result and the disk before and after."""
    root = tmp_path_factory.mktemp("bad_inputs")
    shared = [tiny_run["llama"], tiny_run["baichuan"], tiny_run["data"], bigger_llama, earlier_run_folder]

    def run_case(case):
        name, script, setup, flags, _ = case
        folder = root / name
        folder.mkdir()
        setup(tiny_run, folder, earlier_run_folder)
        flags = {k: v.format(folder=folder, bigger_llama=bigger_llama) if isinstance(v, str) else v
                 for k, v in flags.items()}
        before = snapshot(folder, *shared)
        result = run_script(PYTHON, script, *args_for(tiny_run, folder, **flags), env=ENV, timeout=180)
        return result, before, snapshot(folder, *shared)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([case[0] for case in CASES], pool.map(run_case, CASES)))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gives_one_error_line_and_loses_nothing(case, outcomes):
    name, _, _, _, words = case
    result, before, after = outcomes[name]
    line = assert_one_line_error(result)
    assert all(word in line for word in words), line
    assert after == before, "files changed or disappeared"


# ---- cases that need a run of their own ----------------------------------------------------------------------

@pytest.mark.slow
def test_custom_model_code_never_runs_without_trust_remote_code(tiny_run, tmp_path):
    """A model folder that asks for its own code: without --trust-remote-code the code must not run."""
    model = tmp_path / "custom_model"
    shutil.copytree(tiny_run["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom_llama",
                  auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "custom_code_ran"
    (model / "custom.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()
        from transformers import LlamaConfig, LlamaForCausalLM
        class Config(LlamaConfig):
            model_type = "custom_llama"
        class Model(LlamaForCausalLM):
            config_class = Config
    """))
    before = snapshot(model)
    result = run_script(PYTHON, LLAMA, *args_for(tiny_run, tmp_path, model_name_or_path=model), env=ENV)
    assert not marker.exists(), "the model folder's own code ran without --trust-remote-code"
    line = assert_one_line_error(result)
    assert "trust" in line.lower() or "custom code" in line.lower(), line
    assert snapshot(model) == before



@pytest.mark.slow
@pytest.mark.parametrize("key, value", [("norm_head", "false"), ("num_attention_heads", 0), ("model_type", None)],
                         ids=["norm_head-string", "heads-0", "config-is-an-array"])
def test_bad_baichuan_config_gives_one_error_line_naming_the_key(tiny_run, tmp_path, key, value):
    model = tmp_path / "model"
    shutil.copytree(tiny_run["baichuan"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps([] if value is None else dict(config, **{key: value})))
    result = run_script(PYTHON, BAICHUAN, *args_for(tiny_run, tmp_path, model="baichuan", model_name_or_path=model),
                        env=ENV)
    line = assert_one_line_error(result)
    assert key in line, line

@pytest.mark.slow
@pytest.mark.parametrize("failure, expected", [
    ('RuntimeError("injected failure on rank 1")', "injected failure on rank 1"),
    # One of our error lines met by rank 1 alone (its own disk, say): rank 1 says it, naming itself, once.
    ('FinetuneError("injected problem on rank 1")', "error: [rank 1] injected problem on rank 1\n"),
])
def test_a_rank_that_raises_ends_the_torchrun_job_quickly(tiny_run, tmp_path, failure, expected):
    """Rank 1 raises in its second optimiser step: the whole job must end non-zero, not hang in a collective."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n" + textwrap.dedent("""
        import os
        import torch
        from finetune.errors import FinetuneError
        real_step, calls = torch.optim.AdamW.step, []
        def step(self, *args, **kwargs):
            calls.append(1)
            if os.environ.get("RANK") == "1" and len(calls) == 2:
                raise FAILURE
            return real_step(self, *args, **kwargs)
        torch.optim.AdamW.step = step
        import train_llama2
        sys.exit(train_llama2.main(sys.argv[1:]))
    """).replace("FAILURE", failure))
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               *args_for(tiny_run, tmp_path, max_steps=20, log_interval=1)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **ENV)
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        pytest.fail("the job hung after rank 1 failed")
    assert proc.returncode != 0
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert expected in err and len(error_lines) == expected.startswith("error:"), err[-3000:]
    assert time.monotonic() - start < 90
    assert not (tmp_path / "out" / "model.safetensors").exists()
