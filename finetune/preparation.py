"""The engine behind prepare_dataset.py: tokenise examples with a recipe, report, and write the output safely.

A recipe (defined in prepare_dataset.py) is a dict with `build_prompt`, a function that splits an example into
head, body, tail and response strings, and `columns`, the text columns it reads. Everything here is
recipe-agnostic: tokenisation that keeps the response, label masks, the train/validation split, loading local
or hub data, and an atomic write of the output folder.
"""
import codecs
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from finetune.hub import HubUnreachable, hub_offline, looks_like_path, require_hub, root_cause_message
from finetune.remote_code import asks_for_remote_code, remote_code_error

IGNORE_INDEX = -100
REPORT_FILE = "prepare_report.json"
MADE_BY = "prepare_dataset.py"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


class PrepareError(Exception):
    """A problem with the user's input; prepare_dataset.py prints it as one `error: ...` line."""


def require(ok, message):
    """A command-line check in one line: stop with `error: message` unless `ok`."""
    if not ok:
        raise SystemExit(f"error: {message}")


def require_hub_or_fail(what, name):
    try:
        require_hub(what, name)
    except HubUnreachable as exc:
        raise PrepareError(str(exc)) from None


def full_text(parts):
    return parts["head"] + parts["body"] + parts["tail"] + parts["response"]


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------
def leading_special_ids(tokenizer):
    """Ids the tokenizer puts before any text (Llama: [BOS]; Baichuan: none)."""
    with_specials = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = with_specials.index(without[0]) if without and without[0] in with_specials else 0
    return list(with_specials[:start])


def text_budget(tokenizer, block_size):
    """Characters of one text column that can matter for an example of `block_size` tokens.

    A token covers at most as many characters as its longest vocabulary entry (SentencePiece's "▁" and
    byte-level BPE's "Ġ" stand for one character; Llama 2's longest piece is 16 characters, Baichuan2's 32). So
    the first block_size x longest characters of a text hold at least block_size tokens, more than an example
    keeps; twice that leaves the tokens kept far from the cut, where the cut cannot change them. Texts are cut
    to it before tokenizing: a 64 MB article is not tokenized whole (16M tokens, gigabytes) to keep 1k."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return 2 * block_size * max(longest, 1)


def clip_text(value, budget):
    return value[:budget] if isinstance(value, str) and len(value) > budget else value


def tokenize_examples(batch, build_prompt, tokenizer, block_size, train_on_prompt=False, prefix_ids=None,
                      char_budget=None):
    """Tokenize a batch (dict of column lists) for datasets.map(batched=True).

    The whole text is tokenized once per example, so an example that fits decodes back to exactly
    head + body + tail + response. Where the parts start and end inside those ids is found by tokenizing
    head, head + tail, and head + tail + response or head + body + tail (whichever leaves out more text).
    Text columns are first cut to `char_budget` characters (default: text_budget), which changes no kept token.
    Returns input_ids, labels and per-example statistics columns (names starting with "stat_")."""
    if prefix_ids is None:
        prefix_ids = leading_special_ids(tokenizer)
    if char_budget is None:
        char_budget = text_budget(tokenizer, block_size)
    eos_id = tokenizer.eos_token_id
    size = len(next(iter(batch.values())))
    parts = [build_prompt({name: clip_text(values[index], char_budget) for name, values in batch.items()})
             for index in range(size)]

    fast = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None

    def encode(texts):
        if fast is not None:  # straight to the Rust tokenizer: no offsets, no per-text dicts
            return [e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False)]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    full_ids = encode([full_text(p) for p in parts])
    head_lengths = [len(ids) for ids in encode([p["head"] for p in parts])]
    head_tail_lengths = [len(ids) for ids in encode([p["head"] + p["tail"] for p in parts])]
    # One more, shorter tokenization locates the body/response split: head + tail + response when the body is
    # the long part (articles), head + body + tail when the response is (support answers).
    body_is_longer = sum(len(p["body"]) for p in parts) >= sum(len(p["response"]) for p in parts)
    if body_is_longer:
        probe_ids = encode([p["head"] + p["tail"] + p["response"] for p in parts])
    else:
        probe_ids = encode([p["head"] + p["body"] + p["tail"] for p in parts])

    out = {"input_ids": [], "labels": [], "stat_prompt_cut": [], "stat_response_cut": [], "stat_misaligned": []}
    for ids, n_head, n_head_tail, probe in zip(full_ids, head_lengths, head_tail_lengths, probe_ids):
        n_tail = n_head_tail - n_head
        # The part found both ways must have the same ids; if not, a part boundary falls inside a token
        # (see the module docstring) and the label mask may be off by a token.
        if body_is_longer:
            n_response = len(probe) - n_head_tail
            misaligned = n_response > 0 and ids[len(ids) - n_response:] != probe[n_head_tail:]
        else:
            n_response = len(ids) - len(probe)
            misaligned = ids[:len(probe)] != probe
        n_body = max(len(ids) - n_head - n_tail - n_response, 0)
        out["stat_misaligned"].append(misaligned)

        head = ids[:n_head]
        body = ids[n_head:n_head + n_body]
        tail = ids[n_head + n_body:n_head + n_body + n_tail]
        response = ids[n_head + n_body + n_tail:]
        room = block_size - len(prefix_ids) - n_head - n_tail - 1  # 1 for EOS
        prompt_cut = response_cut = False
        if n_body + len(response) > room:
            if len(response) <= room:
                body = body[:room - len(response)]  # keep the start of the article / question
                prompt_cut = True
            else:
                # The response alone does not fit: drop the body, keep the start of the response. No EOS,
                # since the answer does not end there.
                if room < 0:
                    raise PrepareError(
                        f"--block-size {block_size} is too small to hold the prompt wrapper plus one response token "
                        f"(needs at least {block_size - room})")
                body, response = [], response[:room + 1]
                prompt_cut, response_cut = n_body > 0, True
        prompt = prefix_ids + head + body + tail
        target = response if response_cut else response + [eos_id]
        out["input_ids"].append(prompt + target)
        out["labels"].append(prompt + target if train_on_prompt else [IGNORE_INDEX] * len(prompt) + target)
        out["stat_prompt_cut"].append(prompt_cut)
        out["stat_response_cut"].append(response_cut)
    return out


def split_train_validation(raw, seed=0, validation_fraction=0.05):
    """Keep the source's train/validation splits; otherwise carve a seeded validation split out of train."""
    from datasets import DatasetDict

    if "train" not in raw:
        raise PrepareError(f"the data set has no 'train' split (splits: {', '.join(raw) or 'none'})")
    if "validation" in raw:
        return DatasetDict(train=raw["train"], validation=raw["validation"])
    train = raw["train"]
    if validation_fraction <= 0 or len(train) < 2:
        return DatasetDict(train=train)
    num_validation = min(max(1, round(len(train) * validation_fraction)), len(train) - 1)
    split = train.train_test_split(test_size=num_validation, seed=seed, shuffle=True)
    return DatasetDict(train=split["train"], validation=split["test"])


def check_columns(raw, recipe_name, columns):
    for split_name, split in raw.items():
        if len(split) == 0:
            raise PrepareError(f"split '{split_name}' of the data set is empty")
        missing = [name for name in columns if name not in split.column_names]
        if missing:
            raise PrepareError(f"the {recipe_name} recipe needs column(s) {', '.join(missing)}; "
                               f"the data set has {', '.join(split.column_names) or 'no columns'}")
        for name in columns:
            dtype = getattr(split.features[name], "dtype", None)
            if dtype not in ("string", "large_string"):
                raise PrepareError(f"column '{name}' must hold text, but it holds {dtype or split.features[name]}")


def percentile(sorted_values, fraction):
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))]


def prepare(recipe_name, recipe, tokenizer, raw_dataset_dict, block_size=1024, train_on_prompt=False, seed=0,
            validation_fraction=0.05, max_examples=None):
    """Tokenize raw_dataset_dict (a DatasetDict of text columns) with `recipe` (its build_prompt and columns).

    Returns (DatasetDict with columns input_ids and labels, report dict)."""
    import numpy as np
    import pyarrow.compute as pc

    if block_size < 1:
        raise PrepareError(f"--block-size must be positive, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise PrepareError("the tokenizer has no EOS token")
    if max_examples:  # cap the source before splitting, so a quick try keeps the usual train/validation shape
        raw_dataset_dict = raw_dataset_dict.__class__(
            {name: split.select(range(min(max_examples, len(split)))) for name, split in raw_dataset_dict.items()})
    raw = split_train_validation(raw_dataset_dict, seed=seed, validation_fraction=validation_fraction)
    check_columns(raw, recipe_name, recipe["columns"])

    prefix_ids = leading_special_ids(tokenizer)
    columns = recipe["columns"]
    started = time.perf_counter()
    try:
        tokenized = raw.map(
            tokenize_examples,
            batched=True,
            batch_size=1000,
            fn_kwargs=dict(build_prompt=recipe["build_prompt"], tokenizer=tokenizer, block_size=block_size,
                           train_on_prompt=train_on_prompt, prefix_ids=prefix_ids,
                           char_budget=text_budget(tokenizer, block_size)),
            remove_columns=raw["train"].column_names,
            desc=f"tokenizing ({recipe_name})",
        )
    except TypeError as problem:  # e.g. None in a text column
        raise PrepareError(f"could not build prompts from columns {', '.join(columns)}: {problem}") from None
    seconds = time.perf_counter() - started

    report = {"made_by": MADE_BY, "recipe": recipe_name, "block_size": block_size, "train_on_prompt": train_on_prompt,
              "eos_token_id": tokenizer.eos_token_id, "bos_prefix_ids": prefix_ids, "splits": {}}
    total_tokens = 0
    for name, split in tokenized.items():
        # Column-wise Arrow arithmetic: no Python loop over tokens, even for hundreds of thousands of examples.
        table = split.data.table
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
        targets = int(pc.sum(pc.not_equal(pc.list_flatten(table.column("labels")), IGNORE_INDEX)).as_py() or 0)
        ordered = np.sort(lengths).tolist()
        report["splits"][name] = {
            "examples": len(split),
            "tokens": int(lengths.sum()),
            "target_tokens": targets,
            "length_p50": percentile(ordered, 0.50),
            "length_p90": percentile(ordered, 0.90),
            "length_p99": percentile(ordered, 0.99),
            "length_max": ordered[-1] if ordered else 0,
            "prompt_truncated": int(pc.sum(table.column("stat_prompt_cut")).as_py() or 0),
            "response_truncated": int(pc.sum(table.column("stat_response_cut")).as_py() or 0),
            "misaligned_boundaries": int(pc.sum(table.column("stat_misaligned")).as_py() or 0),
        }
        total_tokens += int(lengths.sum())
    report["tokenize_seconds"] = round(seconds, 3)
    report["tokens_per_second"] = round(total_tokens / seconds) if seconds > 0 else None
    stat_columns = [name for name in tokenized["train"].column_names if name.startswith("stat_")]
    return tokenized.remove_columns(stat_columns), report


def format_report(report):
    lines = [f"recipe {report['recipe']}, block size {report['block_size']}, "
             f"loss on {'prompt and response' if report['train_on_prompt'] else 'response + EOS only'}"]
    for name, stats in report["splits"].items():
        lines.append(
            f"  {name:<10} {stats['examples']:>8} examples  {stats['tokens']:>11} tokens  "
            f"{stats['target_tokens']:>10} target tokens  length p50/p90/p99/max "
            f"{stats['length_p50']}/{stats['length_p90']}/{stats['length_p99']}/{stats['length_max']}  "
            f"prompt truncated {stats['prompt_truncated']}  response truncated {stats['response_truncated']}")
        if stats["misaligned_boundaries"]:
            lines.append(f"  warning: {stats['misaligned_boundaries']} {name} examples have a prompt/response boundary "
                         "inside a token; start recipe parts with a space or newline")
    if report.get("tokens_per_second"):
        lines.append(f"  tokenized in {report['tokenize_seconds']:.2f} s ({report['tokens_per_second']} tokens/s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Loading inputs (local files first; the hub only when it can answer)
# ----------------------------------------------------------------------------------------------
def load_raw_dataset(name_or_path, config_name=None):
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
                raise PrepareError(f"data file {path} is empty")
            file_format = LOCAL_FORMATS.get(path.suffix.lower())
            if file_format is None:
                raise PrepareError(f"unsupported data file type '{path.suffix}' ({path}); "
                                   f"use one of {', '.join(sorted(LOCAL_FORMATS))}")
            check_text_file(path)
            return datasets.load_dataset(file_format, data_files={"train": str(path)})
        if path.is_dir():
            if not any(entry.is_file() for entry in path.rglob("*")):
                raise PrepareError(f"data folder {path} holds no files")
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                loaded = datasets.load_from_disk(str(path))
                return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
            for data_file in sorted(path.rglob("*")):
                check_text_file(data_file)
            return datasets.load_dataset(str(path))
        if looks_like_path(name_or_path):
            raise PrepareError(f"no such file or folder: {name_or_path}")
        require_hub_or_fail("data set", name_or_path)
        return datasets.load_dataset(name_or_path, config_name)
    except PrepareError:
        raise
    except Exception as problem:  # the libraries raise many types for bad files and missing hub data
        message = root_cause_message(problem)
        if "corresponds to no data" in message:
            raise PrepareError(f"data set '{name_or_path}' has no rows") from None
        if not path.exists() and hub_offline():
            raise PrepareError(f"data set '{name_or_path}' is not a local path and not in the local cache, "
                               "and HF_HUB_OFFLINE=1 forbids downloading it; pass a local file or use --demo") from None
        raise PrepareError(f"could not read data set '{name_or_path}': {message}") from None


TEXT_SUFFIXES = (".json", ".jsonl", ".csv")
# The JSON and CSV readers hold about 8 times a line in memory while they parse it (a 256 MB line: 2.3 GB at
# the peak, measured); a longer line is refused before they start rather than killed by the kernel.
MAX_LINE_BYTES = 256 * 2 ** 20
SCAN_CHUNK_BYTES = 16 * 2 ** 20


def check_text_file(path):
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
                raise PrepareError(f"data file {path} is not UTF-8 text (line {line}, byte {position} of the file: "
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
        raise PrepareError(f"line {line} of data file {path} is over {MAX_LINE_BYTES // 2 ** 20} MB; reading it "
                           f"would take about 8 times that in memory. Put one example per line, or cut its text")


def load_tokenizer(name_or_path, trust_remote_code=False):
    """The tokenizer of a local folder or hub id; code the folder ships runs only with `trust_remote_code`."""
    from transformers import AutoTokenizer

    import modeling_baichuan  # noqa: F401  (registers BaichuanTokenizer so AutoTokenizer finds it)
    is_local = Path(name_or_path).expanduser().exists()
    if is_local and not Path(name_or_path).expanduser().is_dir():
        raise PrepareError(f"tokenizer {name_or_path} is a file; pass the folder that holds it")
    if not is_local:
        if looks_like_path(name_or_path):
            raise PrepareError(f"no such tokenizer folder: {name_or_path}")
        require_hub_or_fail("tokenizer", name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser()) if is_local else name_or_path,
                                             trust_remote_code=trust_remote_code)
    except Exception as problem:
        if asks_for_remote_code(problem):
            raise remote_code_error(name_or_path) from None
        if not is_local and hub_offline():
            raise PrepareError(f"tokenizer '{name_or_path}' is not a local folder and not in the local cache, "
                               "and HF_HUB_OFFLINE=1 forbids downloading it; pass a local folder or use --demo") from None
        message = root_cause_message(problem)
        raise PrepareError(f"could not load tokenizer '{name_or_path}': {message}") from None


# ----------------------------------------------------------------------------------------------
# Writing the output safely
# ----------------------------------------------------------------------------------------------
def is_our_output(folder):
    try:
        report = json.loads((Path(folder) / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("made_by") == MADE_BY and (Path(folder) / "dataset_dict.json").exists()


def save_dataset_and_report(dataset, report, folder):
    dataset.save_to_disk(str(folder))
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def output_folder(save_path):
    """--save-path as an absolute folder path, and the folders above it that had to be created for it."""
    target = Path(save_path).expanduser().resolve()
    if not target.name:
        raise PrepareError(f"--save-path {save_path} names no folder")
    if target.exists() and not target.is_dir():
        raise PrepareError(f"--save-path {save_path} exists and is not a folder; not touching it")
    created = [folder for folder in target.parents if not folder.exists()]  # deepest first
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as problem:  # a file on the way, no permission, a read-only disk
        raise PrepareError(f"--save-path {save_path}: cannot create its parent folder ({problem.strerror})") from None
    return target, created


def check_save_path(save_path):
    """Refuse a --save-path we would have to clobber: a file, or a folder this script did not write."""
    target = Path(save_path).expanduser()
    if target.exists():
        if not target.is_dir():
            raise PrepareError(f"--save-path {save_path} exists and is not a folder; not touching it")
        if any(target.iterdir()) and not is_our_output(target):
            raise PrepareError(f"--save-path {save_path} exists and is not a previous prepare_dataset.py output; "
                               "choose another path or remove it yourself")


# The new output is written into .NAME.tmp beside NAME and swapped in; without an atomic swap the previous output
# waits in .NAME.old between two renames. Every run holds .NAME.lock meanwhile, so such folders found by the
# holder are an interrupted run's (".NAME.tmp-xxxx" / ".NAME.old-PID": from versions without the lock).
def _work_paths(target):
    return target.parent / f".{target.name}.tmp", target.parent / f".{target.name}.old"


def _leftovers(target):
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)(-\w+)?")
    found = [path for path in target.parent.iterdir() if pattern.fullmatch(path.name) and path.is_dir()]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)  # newest first


def recover_leftovers(target):
    """Finish what an interrupted write left beside `target`: put a previous output that was moved aside but
    never replaced back in place, and delete half-written or replaced folders. Returns what it did, or None."""
    leftovers = _leftovers(target)
    restored = None
    if not target.exists():
        restored = next((path for path in leftovers if path.name.startswith(f".{target.name}.old")), None)
        if restored is not None:
            os.replace(restored, target)
    for path in leftovers:
        if path != restored:
            shutil.rmtree(path, ignore_errors=True)
    if restored is not None:
        return f"restored the previous output from {restored.name}, left by an interrupted run"
    if leftovers:
        return f"removed {', '.join(path.name for path in leftovers)}, left by an interrupted run"
    return None


def _exchange(first, second):
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(first))


@contextmanager
def claim_save_path(save_path):
    """Hold --save-path for one run: refuse a file, a foreign folder, or a folder another run is writing; recover
    what an interrupted run left. Yields the absolute folder to pass to write_output."""
    target, created = output_folder(save_path)
    lock_path = target.parent / f".{target.name}.lock"
    while True:
        try:
            handle = open(lock_path, "a")
        except OSError as problem:
            raise PrepareError(f"--save-path {save_path}: cannot create {lock_path} ({problem.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise PrepareError(f"another prepare_dataset.py run is writing --save-path {save_path}; wait for it to "
                               "finish or choose another path") from None
        try:  # the lock file may have been removed by the run that held it just before; take the new one then
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        note = recover_leftovers(target)
        if note:
            print(f"note: --save-path {save_path}: {note}")
        check_save_path(save_path)
        yield target
    finally:
        try:  # unlinked before unlocking: a run that opened the file meanwhile sees it is gone and starts over
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                os.unlink(lock_path)
        except FileNotFoundError:
            pass
        handle.close()
        for folder in created if not target.exists() else []:  # a failed run leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break


def write_output(dataset, report, target):
    """Save into `target` (from claim_save_path, still held) so that a kill at any moment leaves the previous
    output or the new one there (or, where paths cannot be swapped atomically, beside it until the next run)."""
    tmp, old = _work_paths(target)
    try:
        try:
            save_dataset_and_report(dataset, report, tmp)
        except OSError as problem:  # a full disk, a quota, a read-only file system
            raise PrepareError(f"could not write the new output for {target}: {problem.strerror or problem}") from None
        if not target.exists():
            os.replace(tmp, target)
        elif not _exchange(tmp, target):
            os.replace(target, old)
            os.replace(tmp, target)
    finally:  # on success this deletes the replaced output; after an error it puts the previous one back
        recover_leftovers(target)
    return str(target)
