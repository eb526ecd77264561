"""finetune/observe/plot.py under bad input: a metrics.jsonl row it cannot draw is one line naming the line, a
folder named as --output is refused before anything is written, and a link at the staging name is not followed.
(The picture of a real run is checked in test_trackers.py.)"""
from finetune.observe.plot import curves_figure, panels
import json
import pytest
from finetune.errors import FinetuneError
from finetune.observe import plot


GOOD = json.dumps({"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_sec": 100.0, "grad_norm": 1.0}) + "\n"


def plot_error(argv):
    """The one `error: ...` line `python -m finetune.observe.plot` stops with."""
    from finetune.observe.plot import main

    with pytest.raises(SystemExit) as stopped:
        main([str(arg) for arg in argv])
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("bad_row, expected", [
    (b"5", "line 2 is a JSON int, not a row object"),
    (b"[1, 2]", "line 2 is a JSON list, not a row object"),
    (b'{"loss": 1.0}', "line 2 has no whole-number step"),
    (b'{"step": "2", "loss": 1.0}', "line 2 has step '2', not a whole number"),
    (b'{"step": 2, "loss": {"a": 1}}', 'line 2 has loss {"a": 1}, not a number'),
    (b'{"step": 2, "lr": "high"}', 'line 2 has lr "high", not a number'),
    (b'{"step": 2, "loss": 1.0, "note": "\xff\xfe"}', "line 2 is not UTF-8 text"),
    (b"[" * 100_000, "line 2 is not JSON"),
])
def test_a_row_that_cannot_be_drawn_is_one_line_naming_it(tmp_path, bad_row, expected):
    (tmp_path / "metrics.jsonl").write_bytes(GOOD.encode() + bad_row + b"\n" + GOOD.encode())
    assert plot_error([tmp_path]) == f"error: {tmp_path / 'metrics.jsonl'} {expected}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_bad_last_row_is_named_unless_it_is_cut_short(tmp_path):
    from finetune.observe.plot import read_metrics

    (tmp_path / "metrics.jsonl").write_bytes(GOOD.encode() + b'{"step": 2, "lo')  # a row still being written
    assert [row["step"] for row in read_metrics(str(tmp_path))] == [1]
    (tmp_path / "metrics.jsonl").write_bytes(GOOD.encode() + b"[2]\n")
    assert "line 2 is a JSON list" in plot_error([tmp_path])


def test_output_naming_a_folder_is_refused_and_leaves_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(GOOD)
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert plot_error([tmp_path, "--output", folder]) == (
        f"error: cannot write {folder}: it is a folder; name a file, e.g. {folder / 'training_curves.png'}")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "pictures"]


def test_a_link_at_the_staging_name_is_replaced_not_followed(tmp_path):
    from finetune.observe.plot import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(GOOD)
    outside = tmp_path / "someone_elses.png"
    outside.write_bytes(b"not ours")
    (run / "training_curves.png.partial.png").symlink_to(outside)
    assert main([str(run)]) == 0
    assert outside.read_bytes() == b"not ours"
    assert (run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "training_curves.png"]


def test_the_end_of_run_picture_of_a_bad_row_is_a_warning_not_a_failed_run(tmp_path, capsys):
    """The model is saved before the picture is drawn: a metrics.jsonl it cannot draw (a resumed run's file that
    was edited by hand) leaves one warning, and the run still ends well."""
    import types

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.observe.metrics import MetricsLog

    backend = types.SimpleNamespace(device=torch.device("cpu"), is_main=True, world_size=1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    logging = types.SimpleNamespace(log_interval=1, peak_tflops=1.0, report_to=())
    (tmp_path / "metrics.jsonl").write_text(GOOD + '{"step": 2, "loss": {"a": 1}}\n')
    MetricsLog(str(tmp_path), backend, model, logging, total_steps=2, start_step=1).close()
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [f"warning: training_curves.png was not drawn: {tmp_path / 'metrics.jsonl'} line 2 has loss "
                       '{"a": 1}, not a number']
    assert not (tmp_path / "training_curves.png").exists()


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


GROUP_ROWS = [{"step": 1, "loss": 3.0, "lr": 1e-3, "lr_group1": 1e-4, "tokens_per_sec": 10.0, "grad_norm": 1.0},
              {"step": 2, "loss": 2.5, "lr": 9e-4, "lr_group1": 9e-5, "tokens_per_sec": 11.0, "grad_norm": 0.9,
               "val_loss": 2.6, "val_accuracy": 0.3, "val_top5_accuracy": 0.6}]


def test_group_rates_and_added_validation_figures_get_drawn():
    titles = [title for title, _ in panels(GROUP_ROWS)]
    assert titles == ["loss", "learning rate", "tokens/s", "gradient norm", "validation"]
    assert dict(panels(GROUP_ROWS))["learning rate"] == [("lr", "group0"), ("lr_group1", "group1")]
    assert dict(panels(GROUP_ROWS))["validation"] == [("val_accuracy", "accuracy"), ("val_top5_accuracy", "top5_accuracy")]
    figure = curves_figure(GROUP_ROWS)
    assert len(figure.axes) == 5
    lr_axes, validation_axes = figure.axes[1], figure.axes[4]
    assert [list(line.get_ydata()) for line in lr_axes.lines] == [[1e-3, 9e-4], [1e-4, 9e-5]]
    assert [list(line.get_ydata()) for line in validation_axes.lines] == [[0.3], [0.6]]


def test_a_run_without_validation_figures_keeps_four_panels():
    rows = [{k: v for k, v in row.items() if not k.startswith(("val_", "lr_"))} for row in GROUP_ROWS]
    assert [title for title, _ in panels(rows)] == ["loss", "learning rate", "tokens/s", "gradient norm"]
    assert dict(panels(rows))["learning rate"] == [("lr", None)]
    assert len(curves_figure(rows).axes) == 4
