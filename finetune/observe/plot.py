"""training_curves.png: a run's metrics.jsonl as a picture (loss and validation loss, learning rate of each
parameter group, tokens/s, gradient norm and the other validation figures against the step). Drawn at the end
of every run; for a run in progress:

    python -m finetune.observe.plot SAVE_DIR [--output PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING

from finetune.checkpoint.run_folder import open_new
from finetune.errors import FinetuneError, entry_point

if TYPE_CHECKING:
    import matplotlib.figure

CURVES_FILE = "training_curves.png"
# (title, [(metrics.jsonl field, legend label)]): one panel each, in reading order.
PANELS = [("loss", [("loss", "training"), ("val_loss", "validation")]),
          ("learning rate", [("lr", None)]),
          ("tokens/s", [("tokens_per_sec", None)]),
          ("gradient norm", [("grad_norm", None)])]


def row_problem(row: object) -> str | None:
    """What keeps a metrics.jsonl row from being drawn, in a few words (None: nothing)."""
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not a row object"
    if isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
        return "has no whole-number step" if "step" not in row else f"has step {row['step']!r}, not a whole number"
    for _, fields in PANELS:
        for field, _ in fields:
            value = row.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                return f"has {field} {json.dumps(value)[:40]}, not a number"
    return None


def read_metrics(save_dir: str) -> list[dict]:
    """The rows of SAVE_DIR/metrics.jsonl; a last row cut short by a running or killed writer is left out."""
    path = os.path.join(save_dir, "metrics.jsonl")
    try:
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named, not a decoding traceback
            lines = f.read().splitlines()
    except OSError as exc:
        raise FinetuneError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "is not UTF-8 text"
        except (ValueError, RecursionError):
            problem = "is not JSON"
        else:
            problem = row_problem(row)
            if problem is None:
                rows.append(row)
                continue
        if number < len(lines) or problem != "is not JSON":  # only the last line may be unfinished
            raise FinetuneError(f"{path} line {number} {problem}")
    return rows


def panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """PANELS, with every parameter group's learning rate (lr_group1, ...) beside `lr`, and a panel of the
    validation figures besides val_loss (val_accuracy and those the script's validation_metrics adds)."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    groups = [(name, name.removeprefix("lr_")) for name in fields if name.startswith("lr_group")]
    figures = [(name, name.removeprefix("val_")) for name in fields if name.startswith("val_") and name != "val_loss"]
    result = [(title, [("lr", "group0" if groups else None)] + groups if title == "learning rate" else entries)
              for title, entries in PANELS]
    return result + ([("validation", figures)] if figures else [])


def curves_figure(rows: list[dict]) -> matplotlib.figure.Figure:
    """A matplotlib Figure of `panels(rows)`, each field plotted at the steps where it was logged."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    from matplotlib.figure import Figure

    shown = panels(rows)
    grid_rows = (len(shown) + 1) // 2
    figure = Figure(figsize=(10, 3.25 * grid_rows), dpi=80)
    # Fixed margins: an automatic layout engine would double the time to draw, paid at the end of every run.
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.08 / grid_rows * 2, top=1 - 0.05 / grid_rows * 2,
                           hspace=0.35, wspace=0.2)
    grid = list(figure.subplots(grid_rows, 2).flat)
    for unused in grid[len(shown):]:
        unused.remove()
    for axes, (title, fields) in zip(grid, shown, strict=False):
        for field, label in fields:
            points = [(row["step"], row[field]) for row in rows if row.get(field) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
        axes.grid(alpha=0.3)
        if any(label for _, label in fields) and axes.lines:
            axes.legend()
    return figure


def write_training_curves(save_dir: str, output: str | None = None) -> str:
    """Draw SAVE_DIR/metrics.jsonl to `output` (default SAVE_DIR/training_curves.png); returns the path."""
    rows = read_metrics(save_dir)
    if not rows:
        raise FinetuneError(f"{os.path.join(save_dir, 'metrics.jsonl')} has no logged step yet")
    output = output or os.path.join(save_dir, CURVES_FILE)
    if os.path.isdir(output):
        raise FinetuneError(f"cannot write {output}: it is a folder; name a file, e.g. "
                            f"{os.path.join(output, CURVES_FILE)}")
    staging = output + ".partial.png"
    try:
        with open_new(staging) as f:  # a link at the staging name is removed, never written through
            curves_figure(rows).savefig(f, format="png")
        os.replace(staging, output)  # a viewer never sees half a picture
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(staging)
        raise FinetuneError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.observe.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("save_dir", help="a training run's --save-model-dir (finished or in progress)")
    parser.add_argument("--output", help=f"where to write the picture (default SAVE_DIR/{CURVES_FILE})")
    args = parser.parse_args(argv)
    print(f"wrote {write_training_curves(args.save_dir, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
