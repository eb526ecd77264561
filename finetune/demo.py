"""The embedded offline default: tiny tokenizers, tiny models and prepared sample data for `--demo` runs.

Everything is built on first use from files the repository ships (data/*.jsonl) and cached under
$FINETUNE_DEMO_CACHE (default <repo>/.demo_cache). Builds are deterministic, and safe when several
processes ask at once: each asset is built under a lock in a temporary folder that is renamed into place.

    ensure_demo_tokenizer("llama2")  -> folder loadable with AutoTokenizer
    ensure_demo_model("baichuan2")   -> folder loadable with AutoModelForCausalLM (after `import modeling_baichuan`)
    ensure_demo_dataset("llama2", recipe, block_size=1024) -> prepare_dataset.py output folder (load_from_disk)

"llama2" and "baichuan2" name a model family here: its tokenizer style and model class. Any recipe can use
the tokenizer of its family (`family_of`), so a newly added recipe works with `--demo` too.
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_SAMPLE_FILES = {
    "llama2": str(REPO_ROOT / "data" / "llama2_sample.jsonl"),
    "baichuan2": str(REPO_ROOT / "data" / "baichuan2_sample.jsonl"),
}
DEMO_CHAT_FILE = str(REPO_ROOT / "data" / "chat_sample.jsonl")  # conversations (prepare_dataset.py chat --demo)
# Bump when the way an asset is built changes; the cache key also hashes the inputs (sample data, code).
DEMO_ASSETS_VERSION = "1"
DEMO_VOCAB_SIZE = 4000
DEMO_MODEL_SIZES = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
DEMO_MAX_LENGTH = 2048
DEMO_SEED = 0

# Baichuan2 keeps its special pieces at fixed ids; the demo tokenizer puts the chat pieces at the
# release's ids (user <reserved_106> = 195, assistant <reserved_107> = 196) so chat code works unchanged.
BAICHUAN_USER_DEFINED_PIECES = (
    ["<SEP>", "<CLS>", "\n", "\t"]
    + [f"<extra_{index}>" for index in range(82)]
    + [f"<reserved_{index}>" for index in range(108)]
)


def demo_cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_DEMO_CACHE") or REPO_ROOT / ".demo_cache")


FAMILIES = ("llama2", "baichuan2")


def family_of(model_name: str) -> str:
    """The demo model family standing in for a hub model: Baichuan's for Baichuan models, Llama's otherwise."""
    return "baichuan2" if "baichuan" in str(model_name).lower() else "llama2"


def _check_family(family):
    if family not in FAMILIES:
        raise ValueError(f"unknown demo model family {family!r}; expected one of {FAMILIES}")


def _fingerprint(*parts) -> str:
    """Short hash of the version string and the given files/strings, used in cache folder names."""
    digest = hashlib.sha256(DEMO_ASSETS_VERSION.encode())
    for part in parts:
        path = Path(part) if isinstance(part, (str, Path)) and Path(part).is_file() else None
        digest.update(path.read_bytes() if path else str(part).encode())
    return digest.hexdigest()[:12]


@contextmanager
def _exclusive_lock(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(name: str, build) -> str:
    """Return <cache>/<name>, calling build(tmp_folder) first if it does not exist yet.

    The lock makes concurrent callers wait for one build; the rename makes a half-written folder impossible
    to see, even if a build is killed midway (its temporary folder is simply left behind and ignored)."""
    root = demo_cache_root()
    target = root / name
    if (target / ".complete").exists():
        return str(target)
    with _exclusive_lock(root / f".{name}.lock"):
        if (target / ".complete").exists():  # another process finished it while we waited
            return str(target)
        if target.exists():  # leftover of an interrupted older layout; rebuild
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by several users
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------
def _training_lines():
    """Text lines the demo tokenizers learn from: both sample files plus the recipes' prompt wrappers,
    so that "[SUMMARIZE]" or "Category is" become a few tokens rather than a string of bytes."""
    lines = []
    for path in DEMO_SAMPLE_FILES.values():
        with open(path, encoding="utf-8") as handle:
            for row in map(json.loads, handle):
                for value in row.values():
                    lines.extend(line for line in str(value).split("\n") if line.strip())
    wrappers = ["[SUMMARIZE] [/SUMMARIZE]", "[INST] Category is Intent is [/INST]"]
    return lines + wrappers * 200


def _train_sentencepiece(add_dummy_prefix: bool, user_defined_symbols) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=DEMO_VOCAB_SIZE,
        hard_vocab_limit=False,  # a small corpus may support fewer merges; take what it gives
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        user_defined_symbols=user_defined_symbols,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,  # one thread keeps the result identical from run to run
        minloglevel=2,
    )
    return model.getvalue()


def _build_llama_tokenizer(folder: Path):
    from transformers import LlamaTokenizer

    # Llama-style: dummy prefix on, no chat pieces. LlamaTokenizer converts tokenizer.model on load.
    (folder / "tokenizer.model").write_bytes(_train_sentencepiece(add_dummy_prefix=True, user_defined_symbols=[]))
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False)
    tokenizer.save_pretrained(str(folder))  # keeps tokenizer.model, adds tokenizer.json + tokenizer_config.json


def _build_baichuan_tokenizer(folder: Path):
    from modeling_baichuan import BaichuanTokenizer

    model_file = folder / "tokenizer.model"
    model_file.write_bytes(_train_sentencepiece(add_dummy_prefix=False,
                                                user_defined_symbols=BAICHUAN_USER_DEFINED_PIECES))
    tokenizer = BaichuanTokenizer(vocab_file=str(model_file))
    assert tokenizer.convert_tokens_to_ids(["<reserved_106>", "<reserved_107>"]) == [195, 196]
    tokenizer.save_pretrained(str(folder))


def ensure_demo_tokenizer(family: str) -> str:
    """Folder of the demo tokenizer of `family` ("llama2" or "baichuan2"), built on first use."""
    _check_family(family)
    sources = list(DEMO_SAMPLE_FILES.values())
    if family == "llama2":
        return _build_once(f"tokenizer-llama2-{_fingerprint(*sources)}", _build_llama_tokenizer)
    return _build_once(f"tokenizer-baichuan2-{_fingerprint(*sources, REPO_ROOT / 'modeling_baichuan.py')}",
                       _build_baichuan_tokenizer)


def load_demo_tokenizer(family: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if family == "baichuan2":
        import modeling_baichuan  # noqa: F401  (registers BaichuanTokenizer with AutoTokenizer)
    return AutoTokenizer.from_pretrained(ensure_demo_tokenizer(family), trust_remote_code=False)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def _demo_model_config(family: str, vocab_size: int):
    if family == "llama2":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, num_key_value_heads=DEMO_MODEL_SIZES["num_attention_heads"],
                           max_position_embeddings=DEMO_MAX_LENGTH, bos_token_id=1, eos_token_id=2,
                           pad_token_id=None, tie_word_embeddings=False, **DEMO_MODEL_SIZES)
    from modeling_baichuan import BaichuanConfig

    return BaichuanConfig(vocab_size=vocab_size, model_max_length=DEMO_MAX_LENGTH, position_embedding="alibi",
                          norm_head=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, **DEMO_MODEL_SIZES)


def _build_model(family: str, folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_demo_tokenizer(family)
    config = _demo_model_config(family, vocab_size=len(tokenizer))
    torch.manual_seed(DEMO_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(folder))  # safetensors is the only format transformers 5 writes
    tokenizer.save_pretrained(str(folder))


def ensure_demo_model(family: str) -> str:
    """Folder with a tiny randomly initialised model (fixed seed, fp32) of `family` and its tokenizer."""
    _check_family(family)
    tokenizer_folder = ensure_demo_tokenizer(family)
    code = [REPO_ROOT / "modeling_baichuan.py"] if family == "baichuan2" else []
    key = _fingerprint(Path(tokenizer_folder).name, json.dumps(DEMO_MODEL_SIZES), DEMO_MAX_LENGTH, DEMO_SEED, *code)
    return _build_once(f"model-{family}-{key}", lambda folder: _build_model(family, folder))


# ----------------------------------------------------------------------------------------------
# Prepared data set
# ----------------------------------------------------------------------------------------------
def _build_dataset(recipe_name: str, recipe: dict, block_size: int, folder: Path):
    from finetune.data import output, preparation, raw_data

    tokenizer = load_demo_tokenizer(family_of(recipe["model"]))
    raw = raw_data.load_raw_dataset(DEMO_SAMPLE_FILES[recipe_name])
    dataset, report = preparation.prepare(recipe_name, recipe, tokenizer, raw, block_size=block_size)
    output.save_dataset_and_report(dataset, report, folder)


def ensure_demo_dataset(recipe_name: str, recipe: dict, block_size: int = 1024) -> str:
    """The bundled sample data of `recipe_name`, prepared with `recipe` (a finetune.data.recipes.RECIPES entry) and
    the demo tokenizer of its family: a prepare_dataset.py output folder (train/validation, input_ids/labels)."""
    if recipe_name not in DEMO_SAMPLE_FILES:
        raise FinetuneError(f"--demo has no bundled sample data for recipe {recipe_name!r}; pass "
                            f"--dataset-name-or-path with a prepare_dataset.py output folder")
    tokenizer_folder = ensure_demo_tokenizer(family_of(recipe["model"]))
    # The prompt function's source is part of the key, so editing a recipe rebuilds its demo data.
    key = _fingerprint(Path(tokenizer_folder).name, DEMO_SAMPLE_FILES[recipe_name], inspect.getsource(
        recipe["build_prompt"]), REPO_ROOT / "finetune" / "data" / "preparation.py")
    return _build_once(f"dataset-{recipe_name}-b{int(block_size)}-{key}",
                       lambda folder: _build_dataset(recipe_name, recipe, int(block_size), folder))
