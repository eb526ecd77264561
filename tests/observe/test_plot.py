"""finetune/observe/plot.py: every parameter group's learning rate and every validation figure are drawn."""
from finetune.observe.plot import curves_figure, panels

ROWS = [{"step": 1, "loss": 3.0, "lr": 1e-3, "lr_group1": 1e-4, "tokens_per_sec": 10.0, "grad_norm": 1.0},
        {"step": 2, "loss": 2.5, "lr": 9e-4, "lr_group1": 9e-5, "tokens_per_sec": 11.0, "grad_norm": 0.9,
         "val_loss": 2.6, "val_accuracy": 0.3, "val_top5_accuracy": 0.6}]


def test_group_rates_and_added_validation_figures_get_drawn():
    titles = [title for title, _ in panels(ROWS)]
    assert titles == ["loss", "learning rate", "tokens/s", "gradient norm", "validation"]
    assert dict(panels(ROWS))["learning rate"] == [("lr", "group0"), ("lr_group1", "group1")]
    assert dict(panels(ROWS))["validation"] == [("val_accuracy", "accuracy"), ("val_top5_accuracy", "top5_accuracy")]
    figure = curves_figure(ROWS)
    assert len(figure.axes) == 5
    lr_axes, validation_axes = figure.axes[1], figure.axes[4]
    assert [list(line.get_ydata()) for line in lr_axes.lines] == [[1e-3, 9e-4], [1e-4, 9e-5]]
    assert [list(line.get_ydata()) for line in validation_axes.lines] == [[0.3], [0.6]]


def test_a_run_without_validation_figures_keeps_four_panels():
    rows = [{k: v for k, v in row.items() if not k.startswith(("val_", "lr_"))} for row in ROWS]
    assert [title for title, _ in panels(rows)] == ["loss", "learning rate", "tokens/s", "gradient norm"]
    assert dict(panels(rows))["learning rate"] == [("lr", None)]
    assert len(curves_figure(rows).axes) == 4
