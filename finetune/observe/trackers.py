"""--report-to: metrics.jsonl's rows also go to TensorBoard, Weights & Biases, MLflow or trackio (rank 0 only).

Each tracker gets every field of a row at the row's step, and run_config.json as the run's config. Local by
default: TensorBoard event files in SAVE_DIR/tensorboard, W&B runs in SAVE_DIR/wandb (offline with
WANDB_MODE=offline), an MLflow file store in SAVE_DIR/mlruns (unless MLFLOW_TRACKING_URI names another store),
trackio's own local store (TRACKIO_DIR moves it).

A resumed run continues the same tracked runs: their ids are kept in SAVE_DIR/trackers.json. metrics.jsonl is
cut back to the checkpoint's step on resume; TensorBoard drops its events past that step too (purge_step),
while the other trackers cannot drop values, so they skip the steps they already hold (`logged_through`): the
step axis has neither gaps nor repeats.

A tracker that talks to a server (W&B online, MLflow over http) has the server checked first: a server that does not
accept a connection within REACH_TIMEOUT seconds is one error line then, not after its client's own retries.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import threading
import time
import urllib.parse

from finetune.checkpoint.run_folder import describe_error, open_new, remove_path, writing
from finetune.config import RUN_CONFIG_FILE
from finetune.errors import FinetuneError

# --report-to name: (module to import, package to install)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny"), "trackio": ("trackio", "trackio")}
STATE_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
PROJECT = "finetune"  # W&B project, MLflow experiment, trackio project (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME win)
REACH_TIMEOUT = 10  # seconds a tracker's server has to accept a connection before the run starts
# What trackers.json keeps of each tracker's run: the fields a resumed run reads back.
STATE_FIELDS = {"tensorboard": ("log_dir",), "wandb": ("id", "project"), "mlflow": ("tracking_uri", "run_id"),
                "trackio": ("project", "name")}


def parse_report_to(text: str) -> tuple[str, ...]:
    """`none` or comma-separated tracker names, each checked to be importable now, before any work starts."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if names in ((), ("none",)):
        return ()
    if "none" in names:
        raise FinetuneError(f"--report-to {text}: none means no tracker, so it cannot be listed with trackers; "
                            f"give none alone, or only tracker names")
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


def state_problem(state: object) -> str | None:
    """What is wrong with the content of trackers.json, in a few words (None: nothing)."""
    if not isinstance(state, dict):
        return f"it holds a JSON {type(state).__name__}, not an object"
    through = state.get("logged_through", 0)
    if isinstance(through, bool) or not isinstance(through, int) or through < 0:
        return f"logged_through is {through!r}, not a step number"
    for name, fields in STATE_FIELDS.items():
        if name not in state:
            continue
        entry = state[name]
        if not isinstance(entry, dict) or not all(isinstance(entry.get(field), str) for field in fields):
            return f"its {name} entry is not an object of {', '.join(fields)} as text"
    return None


def read_state(save_dir: str) -> dict:
    """trackers.json of a resumed run: the ids of its tracked runs and the last step they hold ({} if absent)."""
    path = os.path.join(save_dir, STATE_FILE)
    if not os.path.lexists(path):
        return {}
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read())  # bytes: JSON or not, never a decoding traceback
        problem = state_problem(state)
    except ValueError as exc:  # not JSON, not UTF-8, or nested past the parser's depth
        problem = f"it is not JSON: {str(exc).splitlines()[0]}"
    except OSError as exc:
        problem = describe_error(exc)
    except RecursionError:
        problem = "it is not JSON: nested too deep"
    if problem:
        raise FinetuneError(f"{path} is damaged ({problem}), so the tracked runs cannot be continued; restore it, "
                            f"or delete it to continue in new tracked runs")
    return state


def write_state(save_dir: str, state: dict) -> None:
    """trackers.json, replaced atomically so a kill never leaves half of it (never written through a link)."""
    path = os.path.join(save_dir, STATE_FILE)
    with open_new(path + ".partial") as f:
        f.write(json.dumps(state, indent=2).encode())
    os.replace(path + ".partial", path)


def check_reachable(name: str, url: str) -> None:
    """Refuse a tracker whose http(s) server does not accept a connection within REACH_TIMEOUT seconds (name
    lookup included), before its client spends minutes on retries."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return  # a malformed port: the library's own message says so
    outcome = []

    def connect():
        try:
            socket.create_connection((parts.hostname, port), timeout=REACH_TIMEOUT).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(describe_error(exc))

    # A thread: a name lookup has no timeout of its own, and an unanswered one must not hold the run.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(REACH_TIMEOUT)
    reason = outcome[0] if outcome else f"no answer within {REACH_TIMEOUT} s"
    if reason:
        raise FinetuneError(f"--report-to {name}: cannot reach its server {parts.scheme}://{parts.netloc} "
                            f"({reason}); check the network and the address, or use the tracker offline")


class TensorBoardTracker:
    def __init__(self, save_dir: str, state: dict, start_step: int, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(save_dir, TENSORBOARD_DIR)
        if os.path.islink(log_dir):  # the run folder's rule: never write through a link
            raise FinetuneError(f"{log_dir} is a symbolic link: a run never writes through links out of "
                                f"--save-model-dir; replace it with a real folder")
        # The writer's own thread would print a traceback for a folder it cannot write: try a file first.
        with writing(log_dir):
            if not start_step:
                remove_path(log_dir)  # an earlier run's events in this folder (--overwrite)
            os.makedirs(log_dir, exist_ok=True)
            probe = os.path.join(log_dir, ".write_check")
            open_new(probe).close()
            os.remove(probe)
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

        # The mode and server from the environment and wandb's settings files, read without wandb.setup(), which
        # would also start wandb's service (and its logs) for a run that may be refused.
        try:
            from wandb.sdk.wandb_setup import singleton
            settings = singleton().settings
        except (ImportError, AttributeError):
            settings = wandb.setup().settings
        if settings.mode not in ("offline", "dryrun", "disabled"):
            check_reachable("wandb", settings.base_url)
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
        check_reachable("mlflow", uri)
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
    except FinetuneError:
        raise
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
                try:
                    tracker.log(step, values)
                except Exception as exc:  # a full disk under TensorBoard's writer, a server gone: one line
                    raise FinetuneError(f"--report-to {name}: could not log step {step}: "
                                        f"{describe_error(exc)}") from None
        self._save_state(step)

    def finish(self) -> None:
        for tracker in self.trackers.values():
            tracker.finish()
