"""Loading the inputs of prepare_dataset.py: data files, folders or hub data sets, and tokenizers. Local paths
come first; the hub is asked only when it can answer. Every problem is one FinetuneError line."""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError
from finetune.model.gguf import refuse_gguf
from finetune.model.hub import HubUnreachable, hub_offline, looks_like_path, require_hub, root_cause_message
from finetune.model.remote_code import asks_for_remote_code, remote_code_error

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def require_hub_or_fail(what: str, name: str) -> None:
    try:
        require_hub(what, name)
    except HubUnreachable as exc:
        raise FinetuneError(str(exc)) from None


def load_raw_dataset(name_or_path: str, config_name: str | None = None) -> DatasetDict:
    """DatasetDict from a local file (json, jsonl, csv, parquet, arrow), a save_to_disk folder, a folder of
    data files, or a hub id."""
    import datasets
    from datasets import DatasetDict

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our one error line replaces the library's log lines
    path = Path(name_or_path).expanduser()
    try:
        if path.is_file():
            if path.stat().st_size == 0:
                raise FinetuneError(f"data file {path} is empty")
            file_format = LOCAL_FORMATS.get(path.suffix.lower())
            if file_format is None:
                raise FinetuneError(f"unsupported data file type '{path.suffix}' ({path}); "
                                   f"use one of {', '.join(sorted(LOCAL_FORMATS))}")
            check_text_file(path)
            return datasets.load_dataset(file_format, data_files={"train": str(path)})
        if path.is_dir():
            if not any(entry.is_file() for entry in path.rglob("*")):
                raise FinetuneError(f"data folder {path} holds no files")
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                loaded = datasets.load_from_disk(str(path))
                return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
            for data_file in sorted(path.rglob("*")):
                check_text_file(data_file)
            return datasets.load_dataset(str(path))
        if looks_like_path(name_or_path):
            raise FinetuneError(f"no such file or folder: {name_or_path}")
        require_hub_or_fail("data set", name_or_path)
        return datasets.load_dataset(name_or_path, config_name)
    except FinetuneError:
        raise
    except Exception as problem:  # the libraries raise many types for bad files and missing hub data
        message = root_cause_message(problem)
        if "corresponds to no data" in message:
            raise FinetuneError(f"data set '{name_or_path}' has no rows") from None
        if not path.exists() and hub_offline():
            raise FinetuneError(f"data set '{name_or_path}' is not a local path and not in the local cache, "
                               "and HF_HUB_OFFLINE=1 forbids downloading it; pass a local file or use --demo") from None
        raise FinetuneError(f"could not read data set '{name_or_path}': {message}") from None
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")


# The JSON and CSV readers hold about 8 times a line in memory while they parse it (a 256 MB line: 2.3 GB at
# the peak, measured); a longer line is refused before they start rather than killed by the kernel.
MAX_LINE_BYTES = 256 * 2 ** 20
SCAN_CHUNK_BYTES = 16 * 2 ** 20


def check_text_file(path: str | Path) -> None:
    """A JSON or CSV data file must be UTF-8 (the readers take other bytes into the table as they are, to fail
    later without a name) and have no line over MAX_LINE_BYTES. One pass over the file, a chunk at a time."""
    path = Path(path)
    if path.suffix.lower() not in TEXT_SUFFIXES or not path.is_file():
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = line_start = newlines = 0  # bytes read, where the current line starts, lines ended so far
    with open(path, "rb") as f:
        while True:
            chunk = f.read(SCAN_CHUNK_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as problem:
                # The decoder's input is the bytes it held back from the last chunk (never a newline) plus this one.
                position = offset - (len(problem.object) - len(chunk)) + problem.start
                line = newlines + problem.object[:problem.start].count(b"\n") + 1
                raise FinetuneError(f"data file {path} is not UTF-8 text (line {line}, byte {position} of the file: "
                                   f"{problem.reason}); save it as UTF-8") from None
            if not chunk:
                return
            # Lines that start and end inside one chunk are shorter than it; only the line running on from the
            # last chunk, and the one running on to the next, can be long.
            first = chunk.find(b"\n")
            if first != -1:
                _check_line_length(path, newlines + 1, offset + first - line_start)
                line_start, newlines = offset + chunk.rfind(b"\n") + 1, newlines + chunk.count(b"\n")
            offset += len(chunk)
            _check_line_length(path, newlines + 1, offset - line_start)


def _check_line_length(path, line, length):
    if length > MAX_LINE_BYTES:
        raise FinetuneError(f"line {line} of data file {path} is over {MAX_LINE_BYTES // 2 ** 20} MB; reading it "
                           f"would take about 8 times that in memory. Put one example per line, or cut its text")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a local folder or hub id; code the folder ships runs only with `trust_remote_code`."""
    from transformers import AutoTokenizer

    import modeling_baichuan  # noqa: F401  (registers BaichuanTokenizer so AutoTokenizer finds it)
    refuse_gguf(name_or_path)
    is_local = Path(name_or_path).expanduser().exists()
    if is_local and not Path(name_or_path).expanduser().is_dir():
        raise FinetuneError(f"tokenizer {name_or_path} is a file; pass the folder that holds it")
    if not is_local:
        if looks_like_path(name_or_path):
            raise FinetuneError(f"no such tokenizer folder: {name_or_path}")
        require_hub_or_fail("tokenizer", name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser()) if is_local else name_or_path,
                                             trust_remote_code=trust_remote_code)
    except Exception as problem:
        if asks_for_remote_code(problem):
            raise remote_code_error(name_or_path) from None
        if not is_local and hub_offline():
            raise FinetuneError(f"tokenizer '{name_or_path}' is not a local folder and not in the local cache, "
                               "and HF_HUB_OFFLINE=1 forbids downloading it; pass a local folder or use --demo") from None
        message = root_cause_message(problem)
        raise FinetuneError(f"could not load tokenizer '{name_or_path}': {message}") from None
