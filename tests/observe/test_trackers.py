"""--report-to, run_config.json, training_curves.png and the progress shown while a run works.

One tiny demo run reports to all four trackers at once, stops short of its last checkpoint and is resumed; each
tracker is then read back with its own library's reader and must hold every metrics.jsonl field, at every step,
exactly once, in the same tracked run.
"""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script

TRAIN = REPO_ROOT / "train_llama2.py"
ALL = "tensorboard,wandb,mlflow,trackio"
FIELDS = ("epoch", "loss", "lr", "tokens", "step_time", "tokens_per_sec", "grad_norm", "mfu", "peak_memory_gib")
RUN_ARGS = ["--demo", "--block-size", "256", "--max-steps", "4", "--save-every", "2", "--log-interval", "1",
            "--eval-every", "2", "--num-workers", "0", "--report-to", ALL]


def read_rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def by_step(rows):
    """{step: {field: value}} of metrics.jsonl rows (the fields a tracker gets: every one that has a value)."""
    return {row["step"]: {k: v for k, v in row.items() if k != "step" and v is not None} for row in rows}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A run to step 4 that reported to every tracker; its step-4 checkpoint is then removed (as if it died
    after logging steps 3 and 4 but before saving them), and `--resume` redoes steps 3 and 4 from step 2.
    Skipped without the optional trackers (pip install -r requirements-trackers.txt)."""
    root = tmp_path_factory.mktemp("tracked")
    out = root / "run"
    # One thread: the tiny model gains nothing from more, and on a busy machine they only wait for each other.
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(root / "trackio"),
           "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}
    # This process reads trackio's store back: trackio reads TRACKIO_DIR once, when it is imported.
    os.environ["TRACKIO_DIR"] = env["TRACKIO_DIR"]
    for module in ("tensorboard", "wandb", "mlflow", "trackio"):
        pytest.importorskip(module, reason="the optional trackers are not installed (requirements-trackers.txt)")
    first = run_script(PYTHON, str(TRAIN), *RUN_ARGS, "--save-model-dir", str(out), env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = {"rows": read_rows(out), "state": json.loads((out / "trackers.json").read_text()),
              "config": json.loads((out / "run_config.json").read_text()), "stderr": first.stderr}
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    resumed = run_script(PYTHON, str(TRAIN), *RUN_ARGS, "--save-model-dir", str(out), "--resume", env=env,
                         timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    return {"out": out, "root": root, "before": before, "after": read_rows(out)}


@pytest.mark.slow
def test_the_resumed_run_relogs_steps_3_and_4_in_metrics_jsonl(tracked_run):
    assert [row["step"] for row in tracked_run["before"]["rows"]] == [1, 2, 3, 4]
    assert [row["step"] for row in tracked_run["after"]] == [1, 2, 3, 4]
    assert tracked_run["after"][:2] == tracked_run["before"]["rows"][:2]
    # Steps 3 and 4 were trained again: their timings are new rows, not the first run's.
    assert tracked_run["after"][2]["step_time"] != tracked_run["before"]["rows"][2]["step_time"]
    state = json.loads((tracked_run["out"] / "trackers.json").read_text())
    assert state == tracked_run["before"]["state"]  # the same tracked runs, continued


@pytest.mark.slow
def test_tensorboard_event_files_hold_each_step_once_after_the_resume(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tracked_run["out"] / "tensorboard"
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    # TensorBoard dropped the first run's events past step 2 (purge_step): it now matches metrics.jsonl.
    expected = by_step(tracked_run["after"])
    assert sorted(events.Tags()["scalars"]) == sorted({k for values in expected.values() for k in values})
    for field in events.Tags()["scalars"]:
        logged = [(e.step, e.value) for e in events.Scalars(field)]
        want = [(step, values[field]) for step, values in expected.items() if field in values]
        assert [s for s, _ in logged] == [s for s, _ in want], field
        assert [v for _, v in logged] == pytest.approx([v for _, v in want], rel=1e-6), field
    # The run's settings as hyperparameters (TensorBoard's HPARAMS data) and as text, once.
    from tensorboard.plugins.hparams import plugin_data_pb2

    session = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["optimizer.lr"].number_value == pytest.approx(3e-3)
    assert session.hparams["flags.report_to"].string_value == json.dumps(ALL.split(","))
    text = events.Tensors("run_config/text_summary")
    assert len(text) == 1 and b'"report_to"' in text[0].tensor_proto.string_val[0]


def wandb_records(path):
    """The records of a W&B offline run file (`run-ID.wandb`): W&B's own protobuf Records in a LevelDB-style log
    of 32 KiB blocks, each piece with a 7-byte header (checksum, length, kind: 1 whole, 2 first, 3 middle,
    4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pieces = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            position += block - position % block
            continue
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


@pytest.mark.slow
def test_wandb_offline_runs_continue_one_run_without_repeating_steps(tracked_run):
    from pathlib import Path

    files = sorted(Path(p) for p in glob.glob(str(tracked_run["out"] / "wandb" / "offline-run-*" / "run-*.wandb")))
    run_id = tracked_run["before"]["state"]["wandb"]["id"]
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # first run, then the resume
    history, configs = {}, []
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                step = record.history.step.num
                assert step not in history, f"step {step} logged twice"
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history[step] = {key: value for key, value in items.items() if not key.startswith("_")}
            elif kind == "run":
                assert record.run.run_id == run_id
                configs.append({item.key: json.loads(item.value_json) for item in record.run.config.update})
    # Steps 3 and 4 stay those of the first run, which W&B already holds; steps 1 to 4, each once.
    expected = by_step(tracked_run["before"]["rows"])
    assert sorted(history) == [1, 2, 3, 4]
    for step, values in expected.items():
        assert history[step] == pytest.approx(values, rel=1e-6)
    assert configs[0]["optimizer"] == tracked_run["before"]["config"]["optimizer"]
    assert configs[0]["library_versions"]["torch"] == tracked_run["before"]["config"]["library_versions"]["torch"]


@pytest.mark.slow
def test_mlflow_file_store_holds_one_run_with_every_step_once(tracked_run):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    state = tracked_run["before"]["state"]["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    assert state["tracking_uri"] == "file://" + str(tracked_run["out"] / "mlruns")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.run_id for run in runs] == [state["run_id"]]
    assert runs[0].info.status == "FINISHED"
    expected = by_step(tracked_run["before"]["rows"])
    for field in FIELDS + ("val_loss",):
        history = sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], field))
        want = [(step, values[field]) for step, values in sorted(expected.items()) if field in values]
        assert [s for s, _ in history] == [s for s, _ in want], field
        assert [v for _, v in history] == pytest.approx([v for _, v in want], rel=1e-6), field
    params = runs[0].data.params
    assert float(params["optimizer.lr"]) == tracked_run["before"]["config"]["optimizer"]["lr"]
    assert params["logging.report_to"] == json.dumps(ALL.split(","))


@pytest.mark.slow
def test_trackio_local_store_holds_one_run_with_every_step_once(tracked_run, monkeypatch):
    import trackio.sqlite_storage as storage
    from trackio.sqlite_storage import SQLiteStorage

    # trackio reads TRACKIO_DIR when imported: another test may have imported it before the run set the variable
    monkeypatch.setattr(storage, "TRACKIO_DIR", tracked_run["root"] / "trackio")
    state = tracked_run["before"]["state"]["trackio"]
    assert str(SQLiteStorage.get_project_db_path(state["project"])).startswith(str(tracked_run["root"]))
    assert SQLiteStorage.get_runs(state["project"]) == [state["name"]]
    logs = SQLiteStorage.get_logs(state["project"], state["name"])
    steps = [entry["step"] for entry in logs]
    assert steps == [1, 2, 3, 4]
    for entry in logs:
        want = by_step(tracked_run["before"]["rows"])[entry["step"]]
        assert {k: entry[k] for k in want} == pytest.approx(want, rel=1e-6)
    config = SQLiteStorage.get_run_config(state["project"], state["name"])
    assert config["optimizer"] == tracked_run["before"]["config"]["optimizer"]


@pytest.mark.slow
def test_run_config_holds_every_resolved_flag_the_plan_versions_data_and_commit(tracked_run):
    import torch

    config = json.loads((tracked_run["out"] / "run_config.json").read_text())
    flags = config["flags"]
    assert flags["lr"] == 3e-3 and flags["batch_size"] == 1  # --demo's defaults, resolved
    assert flags["block_size"] == 256 and flags["report_to"] == ALL.split(",") and flags["resume"] is True
    assert {"seed", "warmup_ratio", "max_grad_norm", "cpu_offload", "lora", "peak_tflops"} <= flags.keys()
    assert config["parallel_plan"]["micro_batch_size"] == 1
    assert config["dataset"]["examples"] > 0 and len(config["dataset"]["lengths_sha256"]) == 64
    assert config["library_versions"]["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert config["git"]["commit"] == head.stdout.strip()


@pytest.mark.slow
def test_training_curves_png_is_a_picture_of_metrics_jsonl(tracked_run, tmp_path):
    from PIL import Image

    from finetune.observe.plot import curves_figure, read_metrics

    png = tracked_run["out"] / "training_curves.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (800, 780)  # three rows: validation figures last
        drawn = image.convert("RGB").tobytes()
    # The panels plot metrics.jsonl's own steps and values.
    rows = read_metrics(str(tracked_run["out"]))
    loss_axes, lr_axes, speed_axes, norm_axes, validation_axes = curves_figure(rows).axes
    train_line, val_line = loss_axes.lines
    assert list(train_line.get_xdata()) == [1, 2, 3, 4]
    assert list(train_line.get_ydata()) == [row["loss"] for row in rows]
    assert list(val_line.get_xdata()) == [row["step"] for row in rows if "val_loss" in row] == [2, 4]
    assert list(lr_axes.lines[0].get_ydata()) == [row["lr"] for row in rows]
    assert list(speed_axes.lines[0].get_ydata()) == [row["tokens_per_sec"] for row in rows]
    assert list(norm_axes.lines[0].get_ydata()) == [row["grad_norm"] for row in rows]
    assert list(validation_axes.lines[0].get_ydata()) == [row["val_accuracy"] for row in rows if "val_loss" in row]
    # The file is the resumed run's metrics.jsonl drawn again; a changed loss draws another picture.
    again = run_script(PYTHON, "-m", "finetune.observe.plot", str(tracked_run["out"]), "--output", str(tmp_path / "a.png"))
    assert again.returncode == 0, again.stderr
    with Image.open(tmp_path / "a.png") as image:
        assert image.convert("RGB").tobytes() == drawn
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "metrics.jsonl").write_text("".join(json.dumps(dict(row, loss=row["loss"] / 2)) + "\n" for row in rows)
                                           + '{"step": 5, "lo')  # and a row still being written
    assert run_script(PYTHON, "-m", "finetune.observe.plot", str(changed)).returncode == 0
    with Image.open(changed / "training_curves.png") as image:
        assert image.size == (800, 780) and image.convert("RGB").tobytes() != drawn


@pytest.mark.slow
def test_plot_of_a_folder_without_metrics_is_one_error_line(tmp_path):
    assert_one_line_error(run_script(PYTHON, "-m", "finetune.observe.plot", str(tmp_path)))


@pytest.mark.slow
def test_progress_bar_shows_loss_speed_and_time_left(tracked_run):
    bar = tracked_run["before"]["stderr"]
    last = tracked_run["before"]["rows"][-1]
    assert f"loss {last['loss']:.4f}, {last['tokens_per_sec']:.0f} tokens/s" in bar
    assert "4/4 [" in bar and "<00:00" in bar  # tqdm's elapsed<remaining


@pytest.mark.parametrize("name, package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny"),
                                           ("tensorboard", "tensorboard"), ("trackio", "trackio")])
def test_a_missing_tracker_library_names_its_package(monkeypatch, name, package):
    from finetune.errors import FinetuneError
    from finetune.observe.trackers import parse_report_to

    monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails
    with pytest.raises(FinetuneError) as error:
        parse_report_to(f"tensorboard,{name}" if name != "tensorboard" else "wandb,tensorboard")
    assert str(error.value) == (f"--report-to {name} needs the {package} package, which the core install leaves out: "
                                f"pip install -r requirements-trackers.txt (or pip install {package})")


@pytest.mark.slow
def test_a_missing_tracker_library_is_one_line_before_any_work(tmp_path):
    out = tmp_path / "run"
    blocked = ("import sys, runpy; sys.modules['wandb'] = None; "  # `import wandb` now fails
               f"sys.argv = ['train_llama2.py', '--demo', '--save-model-dir', {str(out)!r}, '--report-to', "
               f"'tensorboard,wandb']; runpy.run_path('train_llama2.py', run_name='__main__')")
    line = assert_one_line_error(run_script(PYTHON, "-c", blocked))
    assert line == ("error: --report-to wandb needs the wandb package, which the core install leaves out: "
                    "pip install -r requirements-trackers.txt (or pip install wandb)")
    assert not out.exists()


def test_report_to_rejects_an_unknown_tracker_and_takes_none():
    from finetune.errors import FinetuneError
    from finetune.observe.trackers import parse_report_to

    assert parse_report_to("none") == ()
    assert parse_report_to(" tensorboard , tensorboard") == ("tensorboard",)
    with pytest.raises(FinetuneError, match="unknown tracker 'comet'"):
        parse_report_to("tensorboard,comet")


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    from finetune.errors import FinetuneError
    from finetune.observe.trackers import Trackers

    (tmp_path / "run_config.json").write_text("{}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://host/path")
    with pytest.raises(FinetuneError, match=r"^--report-to mlflow: could not start the run: .*nosuchscheme") as error:
        Trackers(str(tmp_path), ("mlflow",), 0)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "trackers.json").exists()


@pytest.mark.slow
def test_prepare_dataset_shows_progress_while_tokenising(tmp_path):
    # A data set cache of its own: a tokenising step datasets has cached shows no progress to see
    result = run_script(PYTHON, str(REPO_ROOT / "prepare_dataset.py"), "llama2", "--demo", "--block-size", "256",
                        "--save-path", str(tmp_path / "data"), env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenizing (llama2)" in result.stderr and "100%" in result.stderr


# ---- bad input around the trackers: one line each, nothing followed, no wait on an unreachable server -------------

def test_report_to_none_with_trackers_says_none_stands_alone():
    from finetune.errors import FinetuneError
    from finetune.observe.trackers import parse_report_to

    with pytest.raises(FinetuneError) as error:
        parse_report_to("none,tensorboard")
    assert str(error.value) == ("--report-to none,tensorboard: none means no tracker, so it cannot be listed with "
                                "trackers; give none alone, or only tracker names")


@pytest.mark.parametrize("content, problem", [
    (b'{"logged_through": 3, "tensorboa', "it is not JSON"),
    (b"[1, 2]", "it holds a JSON list, not an object"),
    (b'{"logged_through": "3"}', "logged_through is '3', not a step number"),
    (b'{"logged_through": 3, "wandb": {"id": 5}}', "its wandb entry is not an object of id, project as text"),
    (b"\xff\xfe\x00\x81binary", "it is not JSON"),
    (b"[" * 100_000, "it is not JSON"),
])
def test_a_damaged_trackers_json_on_resume_is_one_line_and_changes_nothing(tmp_path, content, problem):
    from finetune.errors import FinetuneError
    from finetune.observe.trackers import Trackers

    (tmp_path / "run_config.json").write_text("{}")
    (tmp_path / "trackers.json").write_bytes(content)
    with pytest.raises(FinetuneError) as error:
        Trackers(str(tmp_path), ("tensorboard",), 2)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'trackers.json'} is damaged ({problem}") and "\n" not in message
    assert message.endswith("restore it, or delete it to continue in new tracked runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json", "trackers.json"]
    assert (tmp_path / "trackers.json").read_bytes() == content


def test_a_read_only_tensorboard_folder_is_one_line_without_a_thread_traceback(tmp_path, capsys):
    """TensorBoard's writer thread prints its own traceback for a folder it cannot write; the folder is tried
    first, so the run stops with one line."""
    pytest.importorskip("tensorboard")
    import threading

    from finetune.errors import FinetuneError
    from finetune.observe.trackers import Trackers

    (tmp_path / "run_config.json").write_text("{}")
    (tmp_path / "trackers.json").write_text('{"tensorboard": {"log_dir": "x"}, "logged_through": 2}')
    log_dir = tmp_path / "tensorboard"
    log_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(log_dir)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a read-only file system here")
    try:
        with pytest.raises(FinetuneError) as error:
            Trackers(str(tmp_path), ("tensorboard",), 2)
        for thread in threading.enumerate():  # a writer thread that failed has said so by now
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join(5)
    finally:
        subprocess.run(["umount", str(log_dir)], check=True)
    assert str(error.value).startswith(f"could not write '{log_dir / '.write_check'}' (read-only file system)")
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err + printed.out and "Exception in thread" not in printed.err


def test_a_link_at_the_trackers_json_staging_name_is_not_followed(tmp_path):
    pytest.importorskip("tensorboard")
    from finetune.observe.trackers import Trackers

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    outside = tmp_path / "notes.txt"
    outside.write_text("someone else's work")
    (run / "trackers.json.partial").symlink_to(outside)
    Trackers(str(run), ("tensorboard",), 0).finish()
    assert outside.read_text() == "someone else's work"
    assert json.loads((run / "trackers.json").read_text())["logged_through"] == 0
    assert not os.path.lexists(run / "trackers.json.partial")


def closed_loopback_port():
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_server_that_cannot_be_reached_is_refused_in_seconds(tmp_path, monkeypatch, name):
    """W&B online and MLflow over http retry for minutes on their own (105 s and 250 s measured); the server is
    tried first. Only a closed port on the loopback address is used."""
    pytest.importorskip(name)
    import time

    from finetune.errors import FinetuneError
    from finetune.observe.trackers import Trackers

    url = f"http://127.0.0.1:{closed_loopback_port()}"
    (tmp_path / "run_config.json").write_text("{}")
    if name == "wandb":
        import wandb

        wandb.teardown()  # wandb keeps the settings it read first; read this test's
        monkeypatch.setenv("WANDB_MODE", "online")
        monkeypatch.setenv("WANDB_BASE_URL", url)
        monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    started = time.monotonic()
    try:
        with pytest.raises(FinetuneError) as error:
            Trackers(str(tmp_path), (name,), 0)
    finally:
        if name == "wandb":
            wandb.teardown()
    assert time.monotonic() - started < 30
    assert str(error.value) == (f"--report-to {name}: cannot reach its server {url} (connection refused); check the "
                                f"network and the address, or use the tracker offline")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json"]


def test_report_to_help_says_how_long_a_server_has(capsys):
    import train_llama2
    from finetune.args import parse_training_args
    from finetune.observe.trackers import REACH_TIMEOUT

    with pytest.raises(SystemExit):
        parse_training_args("a training script", train_llama2.DEFAULTS, train_llama2.DEMO_DEFAULTS, ["--help"])
    assert REACH_TIMEOUT <= 30
    assert f"within {REACH_TIMEOUT} s, checked before the run starts" in " ".join(capsys.readouterr().out.split())
