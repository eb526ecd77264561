"""finetune/observe/plot.py: training_curves.png from metrics.jsonl; a bad metrics.jsonl is one line."""
import json

import pytest

from finetune.errors import FinetuneError
from finetune.observe import plot

ROWS = [{"step": 1, "loss": 3.0, "lr": 1e-4, "tokens_per_sec": 900.0, "grad_norm": 2.0},
        {"step": 2, "loss": 2.5, "lr": 2e-4, "tokens_per_sec": 950.0, "grad_norm": 1.5, "val_loss": 2.8},
        {"step": 3, "loss": 2.1, "lr": 2e-4, "tokens_per_sec": 940.0, "grad_norm": None},
        {"step": 4, "loss": 1.9, "lr": 1e-4, "tokens_per_sec": 960.0, "grad_norm": 1.1, "val_loss": 2.2}]


def write_metrics(folder, rows, tail=""):
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)


def test_the_png_is_written_from_metrics_jsonl(tmp_path):
    write_metrics(tmp_path, ROWS)
    path = plot.write_training_curves(str(tmp_path))
    assert path == str(tmp_path / plot.CURVES_FILE)
    assert (tmp_path / plot.CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", plot.CURVES_FILE]  # no staging file
    other = plot.write_training_curves(str(tmp_path), str(tmp_path / "elsewhere.png"))
    assert other == str(tmp_path / "elsewhere.png") and (tmp_path / "elsewhere.png").stat().st_size > 1000


def test_each_panel_plots_its_fields_at_the_steps_they_were_logged():
    figure = plot.curves_figure(ROWS)
    panels = {axes.get_title(): axes for axes in figure.axes}
    assert list(panels) == ["loss", "learning rate", "tokens/s", "gradient norm"]
    loss, validation = panels["loss"].lines
    assert (loss.get_label(), list(loss.get_xdata()), list(loss.get_ydata())) == \
        ("training", [1, 2, 3, 4], [3.0, 2.5, 2.1, 1.9])
    assert (validation.get_label(), list(validation.get_xdata()), list(validation.get_ydata())) == \
        ("validation", [2, 4], [2.8, 2.2])
    (norm,) = panels["gradient norm"].lines
    assert list(norm.get_xdata()) == [1, 2, 4]  # the step without a value is left out, not drawn as zero


def test_a_last_row_cut_short_is_left_out(tmp_path):
    write_metrics(tmp_path, ROWS, tail='{"step": 5, "loss": 1.')
    assert plot.read_metrics(str(tmp_path)) == ROWS


def test_a_broken_row_before_the_last_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ROWS[0]) + "\nnot json\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(FinetuneError, match=r"metrics.jsonl line 2 is not JSON$"):
        plot.write_training_curves(str(tmp_path))
    assert not (tmp_path / plot.CURVES_FILE).exists()


def test_missing_or_empty_metrics_are_one_line(tmp_path):
    with pytest.raises(FinetuneError, match=r"^cannot read .*metrics.jsonl: No such file or directory$"):
        plot.write_training_curves(str(tmp_path))
    write_metrics(tmp_path, [])
    with pytest.raises(FinetuneError, match="has no logged step yet"):
        plot.write_training_curves(str(tmp_path))


def test_an_unwritable_output_is_one_line(tmp_path):
    write_metrics(tmp_path, ROWS)
    with pytest.raises(FinetuneError, match=r"^cannot write .*missing_folder/out.png: "):
        plot.write_training_curves(str(tmp_path), str(tmp_path / "missing_folder" / "out.png"))


def test_the_command_prints_the_path_or_one_error_line(tmp_path, capsys):
    write_metrics(tmp_path, ROWS)
    assert plot.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / plot.CURVES_FILE}\n"
    with pytest.raises(SystemExit) as raised:
        plot.main([str(tmp_path / "no_run_here")])
    assert raised.value.code.startswith("error: cannot read ") and "\n" not in raised.value.code
