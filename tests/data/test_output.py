"""finetune/data/output.py: a kill at any step of writing --save-path keeps an output and the next run recovers;
two runs into the same path leave each other alone."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import error_of, PYTHON, REPO_ROOT

import prepare_dataset as pd
from finetune.data import output


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ---- prepare_dataset.py: kills mid-write and two runs at once ----------------------------------------------------

# A child process claims a save path and writes a stand-in data set through finetune.data.output, counting
# every file-system step (file writes, renames, the atomic swap, deletions). At step STOP it dies on the spot (os._exit:
# no cleanup, like SIGKILL) or waits for a "go" file. It imports only finetune.data.output, not the package's
# torch-heavy __init__, so that each of the ~30 children starts in a fraction of a second.
CHILD = r'''
import os, shutil, sys, time, types
from pathlib import Path
package = types.ModuleType("finetune"); package.__path__ = [os.path.join(os.getcwd(), "finetune")]
sys.modules["finetune"] = package
from finetune.data import output

target, stop, how, swap, signals = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
steps = 0

def step(function):
    def counted(*args, **kwargs):
        global steps
        steps += 1
        if steps == stop:
            if how == "kill":
                os._exit(9)
            (signals / "paused").touch()
            while not (signals / "go").exists():
                time.sleep(0.02)
        return function(*args, **kwargs)
    return counted

for owner, name in ((os, "replace"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree"), (Path, "write_text")):
    setattr(owner, name, step(getattr(owner, name)))
output._exchange = step(output._exchange if swap == "exchange" else lambda first, second: False)

class StandIn:
    def save_to_disk(self, folder):
        os.makedirs(folder)
        for name in ("dataset_dict.json", "data.arrow"):
            Path(folder, name).write_text("new")

with output.claim_save_path(target) as folder:
    output.write_output(StandIn(), {"made_by": output.MADE_BY, "run": "new"}, folder)
'''


def write_stand_in(folder, run):
    folder.mkdir()
    for name in ("dataset_dict.json", "data.arrow"):
        (folder / name).write_text(run)
    (folder / output.REPORT_FILE).write_text(json.dumps({"made_by": output.MADE_BY, "run": run}))


def state(folder):
    """'old' or 'new' for a complete stand-in output, 'missing', or 'broken' for anything in between."""
    if not folder.exists():
        return "missing"
    if sorted(os.listdir(folder)) != ["data.arrow", "dataset_dict.json", output.REPORT_FILE]:
        return "broken"
    run = json.loads((folder / output.REPORT_FILE).read_text())["run"]
    data = {(folder / name).read_text() for name in ("data.arrow", "dataset_dict.json")}
    return run if data == {run} else "broken"


def start_child(target, stop, how="kill", swap="exchange", signals=None):
    return subprocess.Popen([PYTHON, "-c", CHILD, str(target), str(stop), how, swap, str(signals or target.parent)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("swap, previous", [("exchange", True), ("two renames", True), ("exchange", False)])
def test_a_kill_at_any_step_keeps_an_output_and_the_next_run_recovers(tmp_path, swap, previous):
    """Kill the writer at step 1, 2, ... until it finishes. With an atomic swap the folder always holds the old
    or the new output; without one it may be missing for one step, with the old output beside it. The next run
    (claiming the path) puts the old output back or keeps the new one, and leaves nothing else."""
    if swap == "exchange":
        (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
        if not output._exchange(tmp_path / "a", tmp_path / "b"):
            pytest.skip("this file system cannot swap two folders in one step")
    seen = []
    for stop in range(1, 40):
        root = tmp_path / f"stop{stop}"
        root.mkdir()
        out = root / "out"
        if previous:
            write_stand_in(out, "old")
        child = start_child(out, stop, swap=swap)
        _, stderr = child.communicate(timeout=60)
        if child.returncode == 0:
            assert state(out) == "new" and os.listdir(root) == ["out"]
            break
        assert child.returncode == 9, stderr
        now = state(out)
        seen.append(now)
        if now == "missing" and previous:  # only between the two renames: the old output waits beside it
            assert swap == "two renames" and state(root / ".out.old") == "old"
        else:
            assert now in ("old", "new") if previous else now in ("missing", "new")
        with output.claim_save_path(out):  # what the next run does first
            pass
        after = state(out)
        assert after == ("old" if now == "missing" and previous else now)
        assert os.listdir(root) == ([] if after == "missing" else ["out"]), os.listdir(root)
    else:
        pytest.fail("the writer never finished")
    assert len(seen) >= 4  # the sweep really stopped the writer at several steps
    assert set(seen) == ({"old", "new", "missing"} if swap == "two renames" else
                         {"old", "new"} if previous else {"missing", "new"})


def test_leftovers_of_the_unlocked_writer_are_recovered(tmp_path):
    """Earlier versions named their folders .NAME.old-PID and .NAME.tmp-XXXX and took no lock."""
    out = tmp_path / "out"
    write_stand_in(tmp_path / ".out.old-4242", "old")
    (tmp_path / ".out.tmp-k2x9a0zq").mkdir()
    (tmp_path / ".out.tmp-k2x9a0zq" / "data.arrow").write_text("half")
    write_stand_in(tmp_path / ".out.tmp.old", "other")  # left by an output named "out.tmp": not ours to touch
    with output.claim_save_path(out):
        pass
    assert state(out) == "old" and sorted(os.listdir(tmp_path)) == [".out.tmp.old", "out"]


def test_a_second_run_into_the_same_path_leaves_the_first_alone(tiny_source, tmp_path):
    out = tmp_path / "out"
    write_stand_in(out, "old")
    signals = tmp_path / "signals"
    signals.mkdir()
    first = start_child(out, 3, how="pause", signals=signals)  # paused while writing its new folder
    try:
        deadline = time.monotonic() + 60
        while not (signals / "paused").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        during = snapshot(tmp_path)
        message = error_of(pd.main, tiny_source + ["--save-path", str(out)])
        assert "another prepare_dataset.py run is writing" in message
        assert snapshot(tmp_path) == during  # the first run's folders and lock untouched
    finally:
        (signals / "go").touch()
        first.communicate(timeout=60)
    assert first.returncode == 0 and state(out) == "new"
    assert sorted(os.listdir(tmp_path)) == ["articles.jsonl", "out", "signals"]


@pytest.mark.slow
def test_the_real_script_killed_between_its_renames_loses_nothing(tiny_source, tmp_path):
    """prepare_dataset.py itself, on a system without an atomic swap, killed right after moving the previous
    output aside. The next run restores it even though that run fails; the one after replaces it."""
    out = tmp_path / "out"
    pd.main(tiny_source + ["--save-path", str(out), "--max-examples", "2"])
    previous = snapshot(out)
    killed = subprocess.run([PYTHON, "-c", r'''
import os, runpy, sys
real_replace = os.replace
def replace(source, destination):
    if os.path.basename(destination) == "out":  # the new output is about to be renamed into place
        os._exit(9)
    return real_replace(source, destination)
os.replace = replace
import finetune.data.output
finetune.data.output._exchange = lambda first, second: False
sys.argv = sys.argv[1:]
runpy.run_path("prepare_dataset.py", run_name="__main__")
''', "prepare_dataset.py", *tiny_source, "--save-path", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not out.exists() and any(snapshot(p) == previous for p in tmp_path.iterdir() if p.name.startswith("."))

    failing = tiny_source[:-1] + [str(tmp_path / "missing.jsonl"), "--save-path", str(out)]
    error_of(pd.main, failing)
    assert snapshot(out) == previous and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    pd.main(tiny_source + ["--save-path", str(out)])
    report = json.loads((out / output.REPORT_FILE).read_text())
    assert report["splits"]["train"]["examples"] + report["splits"]["validation"]["examples"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
