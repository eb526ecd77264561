"""What a run is beyond its flags, so that a resumed run is compared with the run it continues: the model and the
training split by their fingerprints, the optimiser's class and parameter groups (their sizes and hyperparameters),
the learning-rate schedule (its type, settings and factors sampled over the run), the trainable parameters (names
and shapes) and the script's token loss (its code).

Every checkpoint's trainer_state.json holds the record (`describe`); run_config.json holds it summarised
(`summary`). On resume each difference is a phrase (`differences`): the first one refuses the resume in one line
(`refusal`), unless --resume-changed accepts them, and then the run goes on with this run's code (the optimiser
state is kept only where its layout is unchanged, the schedule is fast-forwarded to the checkpoint's step).
"""
import ast
import hashlib
import inspect
import json
import math
import textwrap
import types
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

# Group entries that are not the run's settings: the tensors themselves, the scheduled rate, and how the update is
# computed on this device (fused on GPUs, foreach elsewhere)
NOT_SETTINGS = {"params", "lr", "foreach", "fused", "capturable", "differentiable"}
# A scheduler's progress, not its settings; the lambdas are compared by sampled factors instead
SCHEDULE_PROGRESS = {"last_epoch", "_step_count", "_get_lr_called_within_step", "_last_lr", "_is_initial", "verbose",
                     "lr_lambdas"}


def _plain(value: object) -> object:
    """`value` as JSON values: tensors as numbers, functions by name, anything else unknown by its type (never
    a repr with an address, which would differ between two runs of the same code)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value):
        return getattr(value, "__qualname__", type(value).__name__)
    return type(value).__name__


def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def code_fingerprint(function: Callable | None) -> str | None:
    """SHA-256 of a function's code as Python parses it: its name, comments, blank lines and docstring do not
    count. Without source (a function made by exec), its bytecode and constants."""
    if function is None:
        return None
    function = getattr(function, "func", function)  # functools.partial
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.name = ""
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str) and len(node.body) > 1:
                node.body = node.body[1:]
        text = ast.dump(node)
    except (OSError, TypeError, SyntaxError, IndexError):
        code = getattr(function, "__code__", None)
        text = (code.co_code.hex() + repr(code.co_names) + repr([c for c in code.co_consts
                                                                   if not isinstance(c, types.CodeType)])
                if code else type(function).__qualname__)
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Parameter names and full shapes: enough to tell a checkpoint of another model apart."""
    config = model.config
    return {"model_type": config.model_type, "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "num_parameters": sum(int(np.prod(p.shape)) for p in model.parameters())}


def dataset_fingerprint(lengths: Sequence[int] | np.ndarray) -> dict:
    """The training split as far as the data order sees it: how many examples, and their lengths."""
    return {"examples": int(len(lengths)),
            "lengths_sha256": hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes()).hexdigest()}


def schedule_steps(total_steps: int) -> list[int]:
    """The steps a schedule's factors are sampled at: its start, the warmup, and through the run to its end."""
    return sorted({s for s in (0, 1, 2, total_steps // 20, total_steps // 10, total_steps // 4, total_steps // 2,
                               3 * total_steps // 4, total_steps - 1) if 0 <= s < max(1, total_steps)})


def describe(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, total_steps: int,
             token_loss: Callable | None = None) -> dict:
    """What this run is: the record a checkpoint keeps and a resumed run is compared on."""
    groups = [{"tensors": len(group["params"]), "elements": sum(p.numel() for p in group["params"]),
               "settings": _plain({k: v for k, v in group.items() if k not in NOT_SETTINGS})}
              for group in optimizer.param_groups]
    for group, settings in zip(optimizer.param_groups, groups, strict=True):
        if "initial_lr" not in group:  # no scheduler set a peak: the rate as the script set it
            settings["settings"]["lr"] = _plain(group["lr"])
    schedule = {"class": _class_name(scheduler),
                "settings": _plain({k: v for k, v in scheduler.state_dict().items() if k not in SCHEDULE_PROGRESS})}
    if isinstance(scheduler, LambdaLR):
        schedule["factors"] = [[step, [float(f(step)) for f in scheduler.lr_lambdas]]
                               for step in schedule_steps(total_steps)]
    return {"optimizer": {"class": _class_name(optimizer), "param_groups": groups},
            "scheduler": schedule,
            "trainable": [[name, list(p.shape)] for name, p in model.named_parameters() if p.requires_grad],
            "token_loss": {"name": getattr(getattr(token_loss, "func", token_loss), "__qualname__", None),
                           "code_sha256": code_fingerprint(token_loss)} if token_loss else None}


def summary(record: dict) -> dict:
    """The record for run_config.json: the trainable parameters as a count and a hash, not every name; groups and
    sampled factors keyed by group and step, so that a tracker flattening the config gets short values."""
    trainable, schedule = record["trainable"], record["scheduler"]
    return {"optimizer": {"class": record["optimizer"]["class"],
                          "param_groups": dict(enumerate(record["optimizer"]["param_groups"]))},
            "scheduler": {**schedule, **({"factors": {str(step): factors for step, factors in schedule["factors"]}}
                                        if "factors" in schedule else {})},
            "trainable": {"tensors": len(trainable), "elements": sum(math.prod(shape) for _, shape in trainable),
                          "names_and_shapes_sha256": hashlib.sha256(json.dumps(trainable).encode()).hexdigest()},
            "token_loss": record["token_loss"]}


def _short(class_name: str) -> str:
    return class_name.rsplit(".", 1)[-1]


def _named(items: list) -> str:
    """The first name, and how many more: the subject of "is"/"are"."""
    return f"{items[0]} and {len(items) - 1} more are" if len(items) > 1 else f"{items[0]} is"


def _trainable_differences(then, now):
    shapes_then, shapes_now = ({name: tuple(shape) for name, shape in record} for record in (then, now))
    found = []
    frozen = [n for n in shapes_then if n not in shapes_now]
    trains = [n for n in shapes_now if n not in shapes_then]
    reshaped = [n for n in shapes_now if n in shapes_then and shapes_now[n] != shapes_then[n]]
    if frozen:
        found.append(f"the trainable parameters: {_named(frozen)} frozen now and trained then")
    if trains:
        found.append(f"the trainable parameters: {_named(trains)} trained now and frozen then")
    if reshaped:
        name = reshaped[0]
        found.append(f"the trainable parameters: {name} has shape {list(shapes_now[name])} now, "
                     f"{list(shapes_then[name])} then")
    return found


def _optimizer_differences(then, now):
    if then["class"] != now["class"]:
        return [f"the optimiser: {_short(now['class'])} now, {_short(then['class'])} then"]
    groups_then, groups_now = then["param_groups"], now["param_groups"]
    if len(groups_then) != len(groups_now):
        return [f"the optimiser's parameter groups: {len(groups_now)} now, {len(groups_then)} then"]
    found = []
    for index, (a, b) in enumerate(zip(groups_then, groups_now, strict=True)):
        if (a["tensors"], a["elements"]) != (b["tensors"], b["elements"]):
            found.append(f"parameter group {index}: {b['tensors']} tensors of {b['elements']:,} elements now, "
                         f"{a['tensors']} of {a['elements']:,} then")
        for key in sorted(set(a["settings"]) | set(b["settings"])):
            if a["settings"].get(key) != b["settings"].get(key):
                found.append(f"parameter group {index}'s {key}: {b['settings'].get(key)} now, "
                             f"{a['settings'].get(key)} then")
    return found


def _close(a, b):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
                                    for x, y in zip(a, b, strict=True))


def _schedule_differences(then, now):
    if then["class"] != now["class"]:
        return [f"the learning-rate schedule: {_short(now['class'])} now, {_short(then['class'])} then"]
    for key in sorted(set(then["settings"]) | set(now["settings"])):
        if key != "base_lrs" and then["settings"].get(key) != now["settings"].get(key):
            return [f"the learning-rate schedule's {key}: {now['settings'].get(key)} now, "
                    f"{then['settings'].get(key)} then"]
    for (step, a), (_, b) in zip(then.get("factors", []), now.get("factors", []), strict=False):
        if len(a) == len(b) and not _close(a, b):  # another group count is the optimiser's difference
            show = ", ".join(f"{x:.4g}" for x in b), ", ".join(f"{x:.4g}" for x in a)
            return [f"the learning-rate schedule: its factor at step {step} is {show[0]} now, {show[1]} then"]
    return []


def differences(then: dict, now: dict) -> list[str]:
    """Each way this run (`now`) differs from the run recorded in a checkpoint (`then`), as a phrase; the
    trainable parameters first, as they explain most of the rest."""
    found = _trainable_differences(then["trainable"], now["trainable"])
    found += _optimizer_differences(then["optimizer"], now["optimizer"])
    found += _schedule_differences(then["scheduler"], now["scheduler"])
    if (then["token_loss"] or {}).get("code_sha256") != (now["token_loss"] or {}).get("code_sha256"):
        found.append("the loss: token_loss() is not the code the run being resumed trained with")
    return found


def refusal(path: str, found: list[str]) -> str:
    """The one line that refuses a resume for the first difference found."""
    more = f" (and {len(found) - 1} more difference{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
    return (f"{found[0]}{more}: this run is not the one checkpoint {path} continues; start fresh with --overwrite, "
            f"or add --resume-changed to continue it with the change. Nothing was deleted")


def same_optimizer_layout(then: dict, now: dict) -> bool:
    """The checkpoint's optimiser state fits this optimiser: the same class, groups of the same tensors."""
    sizes = [[(g["tensors"], g["elements"]) for g in r["optimizer"]["param_groups"]] for r in (then, now)]
    return (then["optimizer"]["class"] == now["optimizer"]["class"] and sizes[0] == sizes[1]
            and not _trainable_differences(then["trainable"], now["trainable"]))


def fast_forward(scheduler: LRScheduler, step: int) -> None:
    """Step a freshly made schedule `step` times: the learning rate this run's code gives at the resumed step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose here
        for _ in range(step):
            scheduler.step()
