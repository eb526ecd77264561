"""docs/customising.md, "Customising by editing": each documented edit applied to a copy of train_llama2.py, trained a
few steps on the tiny model, resumed, and checked (the loss really changes, frozen weights stay put, the figure
appears everywhere); resuming across an edit ends in one line naming the difference."""
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import PYTHON, REPO_ROOT, assert_one_line_error, run_script
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

DOC = REPO_ROOT / "docs" / "customising.md"
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
ARGS = ["--block-size", "128", "--batch-size", "4", "--max-steps", "4", "--lr", "1e-2", "--log-interval", "1",
        "--num-workers", "0", "--seed", "0", "--save-every", "2"]


# ---- the doc's edits, as a reader applies them ---------------------------------------------------------------------

def doc_section(title):
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def diff_blocks(section):
    return re.findall(r"```diff\n(.*?)```", section, flags=re.S)


def apply_diff(text, block):
    """`text` with the hunks of one ```diff block applied; each hunk's old lines must be there exactly once."""
    hunks, lines = [], []
    for line in block.splitlines():
        if line.startswith(("--- ", "+++ ")):
            continue
        if line.startswith("@@"):
            hunks.append(lines)
            lines = []
        else:
            lines.append(line)
    hunks.append(lines)
    for hunk in filter(None, hunks):
        old = "".join(line[1:] + "\n" for line in hunk if line[:1] in (" ", "-"))
        new = "".join(line[1:] + "\n" for line in hunk if line[:1] in (" ", "+"))
        assert text.count(old) == 1, f"the doc's lines are not in the script exactly once:\n{old}"
        text = text.replace(old, new)
    return text


def edited_script(folder, title, block=0):
    """A copy of train_llama2.py in `folder` with diff block `block` of the doc's section `title` applied."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_llama2.py"
    path.write_text(apply_diff((REPO_ROOT / "train_llama2.py").read_text(), diff_blocks(doc_section(title))[block]))
    return path


def train(script, tiny_run, out, *extra, ok=True):
    result = run_script(PYTHON, str(script), "--model-name-or-path", tiny_run["llama"], "--dataset-name-or-path",
                        tiny_run["data"], "--save-model-dir", str(out), *ARGS, *extra, env=ENV, timeout=600)
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


def from_step_2(out, name):
    """A copy of the run folder `out` (in a new folder beside it) as if the run had stopped after its step-2
    checkpoint."""
    copy = Path(tempfile.mkdtemp(dir=Path(out).parent)) / name
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000004")
    return copy


def resume_matches(script, tiny_run, out, *extra):
    """Resumed from step 2 by the same script, the run ends bit for bit where it did."""
    resumed = from_step_2(out, Path(out).name + "_resumed")
    result = train(script, tiny_run, resumed, "--resume", *extra)
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    a, b = weights(out), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended elsewhere"
    strip = lambda rs: [(r["step"], r["loss"], r["lr"], r.get("lr_group1"), r.get("val_loss")) for r in rs]  # noqa
    assert strip(rows(out)) == strip(rows(resumed))
    return resumed


def refused(script, tiny_run, out, *extra):
    """The one error line of resuming a copy of `out` from step 2 with `script`."""
    return assert_one_line_error(train(script, tiny_run, from_step_2(out, Path(out).name + "_refused"), "--resume",
                                       *extra, ok=False))


@pytest.fixture(scope="module")
def original(tiny_run, tmp_path_factory):
    """The script as it is (a copy), and its run."""
    folder = tmp_path_factory.mktemp("original")
    script = folder / "train_llama2.py"
    shutil.copy(REPO_ROOT / "train_llama2.py", script)
    out = folder / "run"
    result = train(script, tiny_run, out)
    return {"script": script, "out": out, "stdout": result.stdout}


# ---- the edits ------------------------------------------------------------------------------------------------------

def test_the_loss_edit_changes_the_training_loss_not_val_loss_under_either_loss_path(tiny_run, original, tmp_path):
    script = edited_script(tmp_path / "loss", "The loss")
    out, chunked = tmp_path / "loss" / "run", tmp_path / "loss" / "chunked"
    train(script, tiny_run, out)
    first, reference = rows(out)[0], rows(original["out"])[0]
    # The same weights at step 1: the z-loss adds about 1e-4 x ln(128)^2 (near-uniform logits), and the updates differ
    assert first["loss"] > reference["loss"] + 1e-3
    edited_weights, original_weights = weights(out), weights(original["out"])
    assert all(not torch.equal(edited_weights[k], original_weights[k]) for k in edited_weights)
    result = train(script, tiny_run, chunked, "--chunked-loss", "on")
    assert "loss: token_loss 1024 tokens at a time (--chunked-loss on)" in result.stdout
    assert [r["loss"] for r in rows(chunked)] == pytest.approx([r["loss"] for r in rows(out)], abs=1e-5)
    resume_matches(script, tiny_run, out)
    line = refused(original["script"], tiny_run, out)
    assert line.startswith("error: the loss: token_loss() is not the code the run being resumed trained with")
    assert "--overwrite" in line and "--resume-changed" in line


def test_a_group_for_the_embeddings_trains_at_its_own_rate(tiny_run, original, tmp_path):
    script = edited_script(tmp_path / "groups", "The optimiser and its parameter groups", 0)
    out = tmp_path / "groups" / "run"
    train(script, tiny_run, out)
    for row in rows(out):
        assert row["lr_group1"] == pytest.approx(row["lr"] / 10)
    groups = json.loads((out / "run_config.json").read_text())["what_ran"]["optimizer"]["param_groups"]
    assert [groups[g]["tensors"] for g in ("0", "1")] == [20, 1]
    assert groups["1"]["settings"]["initial_lr"] == pytest.approx(1e-3)
    resume_matches(script, tiny_run, out)
    assert refused(original["script"], tiny_run, out).startswith(
        "error: the optimiser's parameter groups: 1 now, 2 then")


def test_adafactor_trains_and_a_resume_names_the_optimiser(tiny_run, original, tmp_path):
    script = edited_script(tmp_path / "adafactor", "The optimiser and its parameter groups", 1)
    out = tmp_path / "adafactor" / "run"
    train(script, tiny_run, out)
    config = json.loads((out / "run_config.json").read_text())
    assert config["what_ran"]["optimizer"]["class"] == "torch.optim.Adafactor"
    assert rows(out)[-1]["loss"] != rows(original["out"])[-1]["loss"]
    resume_matches(script, tiny_run, out)
    assert refused(original["script"], tiny_run, out).startswith("error: the optimiser: AdamW now, Adafactor then")
    # The other way round, the original run resumed under the edit: the line, then on purpose
    assert refused(script, tiny_run, original["out"]).startswith("error: the optimiser: Adafactor now, AdamW then")
    accepted = train(script, tiny_run, from_step_2(original["out"], "adafactor_accepted"), "--resume-changed")
    assert "note: --resume-changed: continuing with the optimiser: Adafactor now, AdamW then" in accepted.stdout
    assert "the optimiser state is started afresh" in accepted.stdout


def test_frozen_layers_stay_put_and_a_resume_across_the_freeze_restores_what_they_trained_to(tiny_run, original,
                                                                                          tmp_path):
    script = edited_script(tmp_path / "freeze", "Freezing")
    out = tmp_path / "freeze" / "run"
    result = train(script, tiny_run, out)
    base, final = load_file(str(Path(tiny_run["llama"]) / "model.safetensors")), weights(out)
    frozen = [k for k in base if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"]
    trained = [k for k in base if k.startswith("model.layers.1.")]
    assert all(torch.equal(final[k], base[k]) for k in frozen)
    assert all(not torch.equal(final[k], base[k]) for k in trained)
    frozen_count = sum(base[k].numel() for k in frozen)
    assert f"  frozen_parameters: {frozen_count}\n" in result.stdout
    assert f"  trainable_parameters: {sum(t.numel() for t in base.values()) - frozen_count}\n" in result.stdout
    resume_matches(script, tiny_run, out)

    # The unedited run's checkpoint trained layer 0: resumed under the freeze, refused, then accepted on purpose
    line = refused(script, tiny_run, original["out"])
    assert line.startswith("error: the trainable parameters: model.embed_tokens.weight and 9 more are frozen now "
                           "and trained then"), line
    continued = from_step_2(original["out"], "freeze_accepted")
    at_step_2 = {"model": {k: torch.zeros_like(base[k]) for k in frozen}}
    dcp.load(at_step_2, checkpoint_id=str(continued / "checkpoints" / "step-00000002"))
    train(script, tiny_run, continued, "--resume-changed")
    after = weights(continued)
    for k in frozen:  # the values they had trained to at step 2, not the base weights, and unchanged since
        assert torch.equal(after[k], at_step_2["model"][k]) and not torch.equal(after[k], base[k]), k


def test_an_added_validation_figure_appears_everywhere(tiny_run, original, tmp_path):
    pytest.importorskip("tensorboard", reason="the optional trackers are not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.observe.plot import panels

    script = edited_script(tmp_path / "metric", "Validation figures")
    out = tmp_path / "metric" / "run"
    result = train(script, tiny_run, out, "--eval-every", "2", "--report-to", "tensorboard")
    validated = [r for r in rows(out) if "val_loss" in r]
    assert [r["step"] for r in validated] == [2, 4]
    assert all(r["val_accuracy"] <= r["val_top5_accuracy"] <= 1 for r in validated)
    assert result.stdout.count("| Val top5 accuracy: ") == 2
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_top5_accuracy")] == [2, 4]
    assert ("val_top5_accuracy", "top5_accuracy") in dict(panels(rows(out)))["validation"]
    assert (out / "training_curves.png").stat().st_size > 0
    # the training itself is the unedited one: a figure changes nothing of the run
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(original["out"])]
    resume_matches(script, tiny_run, out, "--eval-every", "2", "--report-to", "tensorboard")


def test_a_constant_rate_and_a_resume_that_names_the_schedule(tiny_run, original, tmp_path):
    script = edited_script(tmp_path / "constant", "The learning-rate schedule")
    out = tmp_path / "constant" / "run"
    train(script, tiny_run, out)
    assert [r["lr"] for r in rows(out)] == [1e-2] * 4
    resume_matches(script, tiny_run, out)
    line = refused(original["script"], tiny_run, out)
    assert line.startswith("error: the learning-rate schedule: its factor at step "), line
    # what the doc shows: the cosine run's checkpoint under the constant rate
    shown = re.search(r"error: the learning-rate schedule: [^:]*", doc_section("How a resume treats an edit"))[0]
    assert refused(script, tiny_run, original["out"]).startswith(shown)
    # on purpose: the new rate from the resumed step on, each resumed part's run_config.json kept
    continued = from_step_2(original["out"], "constant_accepted")
    train(script, tiny_run, continued, "--resume-changed")
    assert [r["lr"] for r in rows(continued)][2:] == [1e-2, 1e-2]
    assert [r["lr"] for r in rows(continued)][:2] == [r["lr"] for r in rows(original["out"])][:2]
    parts = json.loads((continued / "run_config.1.json").read_text()), json.loads(
        (continued / "run_config.json").read_text())
    assert parts[0]["resumed_from"] is None and parts[1]["resumed_from"]["step"] == 2
    assert parts[0]["what_ran"]["scheduler"]["factors"] != parts[1]["what_ran"]["scheduler"]["factors"]


def test_a_new_recipe_prepares_trains_and_resumes(tmp_path):
    section = doc_section("A new recipe")
    recipe_code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    commands = [line for line in re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].splitlines() if line]
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("prepare_dataset.py", "train_llama2.py", "modeling_baichuan.py"):
        shutil.copy(REPO_ROOT / name, repo / name)
    for folder in ("finetune", "data"):
        shutil.copytree(REPO_ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    recipes = repo / "finetune" / "data" / "recipes.py"
    recipes.write_text(recipes.read_text() + "\n\n" + recipe_code)
    with open(repo / "my_alpaca.jsonl", "w") as f:
        for index in range(300):
            f.write(json.dumps({"instruction": f"Add {index} and {index + 1}.", "input": "" if index % 2 else
                                "Show the sum only.", "output": f"{2 * index + 1}"}) + "\n")
    env = {"OMP_NUM_THREADS": "1"}
    prepare = run_script(PYTHON, *commands[0].split()[1:], cwd=repo, env=env, timeout=600)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    train_args = commands[1].split()[1:] + ["--max-steps", "4", "--save-every", "2", "--log-interval", "1",
                                            "--num-workers", "0"]
    trained = run_script(PYTHON, *train_args, cwd=repo, env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = repo / "alpaca_demo_output"
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    first = rows(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    resumed = run_script(PYTHON, *train_args, "--resume", cwd=repo, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [(r["step"], r["loss"]) for r in rows(out)] == [(r["step"], r["loss"]) for r in first]


def test_a_class_of_ones_own_trains_and_resumes(tiny_run, tmp_path):
    section = doc_section("A different model class")
    module = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    script = edited_script(tmp_path / "class", "A different model class")
    (tmp_path / "class" / "my_model.py").write_text(module)
    out = tmp_path / "class" / "run"
    train(script, tiny_run, out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MyLlamaForCausalLM"]
    assert len(rows(out)) == 4
    resume_matches(script, tiny_run, out)
