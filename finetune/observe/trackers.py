"""--report-to: metrics.jsonl's rows also go to TensorBoard, Weights & Biases, MLflow or trackio (rank 0 only).

Each tracker gets every field of a row at the row's step, and run_config.json as the run's config. Local by
default: TensorBoard event files in SAVE_DIR/tensorboard, W&B runs in SAVE_DIR/wandb (offline with
WANDB_MODE=offline), an MLflow file store in SAVE_DIR/mlruns (unless MLFLOW_TRACKING_URI names another store),
trackio's own local store (TRACKIO_DIR moves it).

A resumed run continues the same tracked runs: their ids are kept in SAVE_DIR/trackers.json. metrics.jsonl is
cut back to the checkpoint's step on resume; TensorBoard drops its events past that step too (purge_step),
while the other trackers cannot drop values, so they skip the steps they already hold (`logged_through`): the
step axis has neither gaps nor repeats.
"""
from __future__ import annotations

import importlib
import json
import os
import time

from finetune.checkpoint.run_folder import remove_path, writing
from finetune.config import RUN_CONFIG_FILE
from finetune.errors import FinetuneError

# --report-to name: (module to import, package to install)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny"), "trackio": ("trackio", "trackio")}
STATE_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
PROJECT = "finetune"  # W&B project, MLflow experiment, trackio project (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME win)


def parse_report_to(text: str) -> tuple[str, ...]:
    """`none` or comma-separated tracker names, each checked to be importable now, before any work starts."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise FinetuneError(f"--report-to: unknown tracker {unknown[0]!r}; choose from "
                            f"{', '.join(BACKENDS)} (comma-separated) or none")
    for name in names:
        module, package = BACKENDS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise FinetuneError(f"--report-to {name} needs the {package} package, which the core install leaves "
                                f"out: pip install -r requirements-trackers.txt (or pip install {package})") from None
    return names


def flat_config(config: dict, prefix: str = "") -> dict:
    """{"optimizer.lr": 1e-5, ...}: nested settings as one level of scalars (lists and None as JSON text)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def read_state(save_dir: str) -> dict:
    path = os.path.join(save_dir, STATE_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_state(save_dir: str, state: dict) -> None:
    """trackers.json, replaced atomically so a kill never leaves half of it."""
    path = os.path.join(save_dir, STATE_FILE)
    with open(path + ".partial", "w") as f:
        json.dump(state, f, indent=2)
    os.replace(path + ".partial", path)


class TensorBoardTracker:
    def __init__(self, save_dir: str, state: dict, start_step: int, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(save_dir, TENSORBOARD_DIR)
        if not start_step:
            remove_path(log_dir)  # an earlier run's events in this folder (--overwrite)
        # Resumed: TensorBoard's readers drop the earlier events from this step on, as metrics.jsonl did.
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)
        if "tensorboard" not in state:  # a new log folder (a resumed one has the settings already)
            self._log_config(config)
        state["tensorboard"] = {"log_dir": log_dir}

    def _log_config(self, config):
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(flat_config(config), {}):  # the HPARAMS tab
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("run_config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "))

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a run in progress is readable at once

    def finish(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, save_dir: str, state: dict, start_step: int, config: dict) -> None:
        import wandb

        run_id = state.get("wandb", {}).get("id") if start_step else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), dir=save_dir, config=config,
                              id=run_id, resume="allow",
                              name=os.path.basename(os.path.abspath(save_dir)))
        state["wandb"] = {"id": self.run.id, "project": self.run.project}

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, save_dir: str, state: dict, start_step: int, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        previous = state.get("mlflow", {}) if start_step else {}
        uri = previous.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        uri = uri or "file://" + os.path.abspath(os.path.join(save_dir, "mlruns"))
        if uri.startswith("file:"):  # a local file store: MLflow 3 asks for this opt-in (its default is a database)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if previous.get("run_id"):
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id,
                                                 run_name=os.path.basename(os.path.abspath(save_dir))).info.run_id
            # Parameters are fixed once logged: the resumed run keeps them (the checkpoint fixed them too).
            params = [Param(key, str(value)) for key, value in flat_config(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 per call
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        state["mlflow"] = {"tracking_uri": uri, "run_id": self.run_id}

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    def __init__(self, save_dir: str, state: dict, start_step: int, config: dict) -> None:
        import trackio

        self.trackio = trackio
        previous = state.get("trackio", {}) if start_step else {}
        name = previous.get("name") or f"{os.path.basename(os.path.abspath(save_dir))}-{time.strftime('%Y%m%d-%H%M%S')}"
        project = previous.get("project", PROJECT)
        trackio.init(project=project, name=name, config=config, resume="allow", auto_log_gpu=False,
                     auto_log_cpu=False)
        state["trackio"] = {"project": project, "name": name}

    def log(self, step: int, values: dict) -> None:
        self.trackio.log(values, step=step)

    def finish(self) -> None:
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
            "trackio": TrackioTracker}


def start_tracker(name: str, save_dir: str, state: dict, start_step: int,
                  config: dict) -> TensorBoardTracker | WandbTracker | MlflowTracker | TrackioTracker:
    """The tracker `name`, its run started or resumed; a library that refuses (no login, a bad tracking URI, an
    unreachable server) gives one line, whatever it raised."""
    try:
        return TRACKERS[name](save_dir, state, start_step, config)
    except Exception as exc:  # each library has its own exception types; the user needs its message only
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FinetuneError(f"--report-to {name}: could not start the run: {first_line}") from None


class Trackers:
    """The trackers of --report-to for one run (made on rank 0 only); `log(row)` sends one metrics.jsonl row."""

    def __init__(self, save_dir: str, names: tuple[str, ...], start_step: int):
        """`start_step`: 0 for a fresh run (new tracked runs), else the checkpoint step a resumed run starts at."""
        self.save_dir = save_dir
        self.state = read_state(save_dir) if start_step else {}
        # Steps a tracker other than TensorBoard already holds: the run that died after its last checkpoint.
        self.skip_through = self.state.get("logged_through", 0)
        with open(os.path.join(save_dir, RUN_CONFIG_FILE)) as f:
            config = json.load(f)
        self.trackers = {name: start_tracker(name, save_dir, self.state, start_step, config) for name in names}
        self._save_state(start_step)

    def _save_state(self, step):
        self.state["logged_through"] = max(step, self.skip_through)
        with writing(os.path.join(self.save_dir, STATE_FILE), self.save_dir):  # a full disk: one line
            write_state(self.save_dir, self.state)

    def log(self, row: dict) -> None:
        step = row["step"]
        values = {key: value for key, value in row.items() if key != "step" and value is not None}
        for name, tracker in self.trackers.items():
            if name == "tensorboard" or step > self.skip_through:
                tracker.log(step, values)
        self._save_state(step)

    def finish(self) -> None:
        for tracker in self.trackers.values():
            tracker.finish()
