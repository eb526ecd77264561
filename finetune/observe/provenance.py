"""Where a run came from, for run_config.json: the versions of the libraries it ran with and the git commit of
the scripts."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

# The libraries that decide what a run computes, plus the trackers it may report to.
LIBRARIES = ("torch", "transformers", "datasets", "tokenizers", "safetensors", "accelerate", "peft", "bitsandbytes",
             "numpy", "tensorboard", "wandb", "mlflow-skinny", "mlflow", "trackio", "matplotlib")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def library_versions() -> dict:
    """Installed version of each library in LIBRARIES (absent ones left out), and Python's."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_commit(folder: str = REPO_ROOT) -> dict | None:
    """The commit the scripts were checked out at and whether they had changes since; None outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        changed = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or a commit-less one
        return None
    return {"commit": commit, "uncommitted_changes": changed}
