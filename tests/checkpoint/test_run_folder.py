"""finetune/checkpoint/run_folder.py: a resumed run keeps the run_config.json of each part before it; a fresh run
clears them."""
import json

from finetune.checkpoint import run_folder


def test_each_resume_keeps_the_run_config_before_it_and_a_fresh_run_clears_them(tmp_path):
    assert run_folder.keep_run_config(str(tmp_path)) is None  # nothing to keep yet
    for part in range(3):
        kept = run_folder.keep_run_config(str(tmp_path))
        assert kept is None or kept.endswith(f"run_config.{part}.json")
        (tmp_path / "run_config.json").write_text(json.dumps({"part": part}))
    assert json.loads((tmp_path / "run_config.1.json").read_text()) == {"part": 0}
    assert json.loads((tmp_path / "run_config.2.json").read_text()) == {"part": 1}
    assert json.loads((tmp_path / "run_config.json").read_text()) == {"part": 2}
    (tmp_path / run_folder.RUN_MARKER).write_text("{}")
    (tmp_path / "run_config.notes.json").write_text("{}")  # not a part: not ours to remove
    run_folder.start_run_dir(str(tmp_path), "train_llama2.py")
    assert sorted(p.name for p in tmp_path.glob("run_config*")) == ["run_config.json", "run_config.notes.json"]
