"""finetune/observe/provenance.py: installed library versions and the scripts' git commit."""
import os
import importlib.metadata
import platform
import subprocess

import pytest
from conftest import REPO_ROOT

from finetune.observe import provenance


def test_library_versions_are_the_installed_ones():
    versions = provenance.library_versions()
    assert versions["python"] == platform.python_version()
    for name in ("torch", "transformers", "datasets", "numpy"):
        assert versions[name] == importlib.metadata.version(name)
    assert set(versions) <= {"python", *provenance.LIBRARIES}


def test_an_absent_library_is_left_out(monkeypatch):
    monkeypatch.setattr(provenance, "LIBRARIES", ("numpy", "no-such-library-for-this-test"))
    assert provenance.library_versions() == {"python": platform.python_version(),
                                             "numpy": importlib.metadata.version("numpy")}


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=test", "-c", "user.email=test@example.com",
                           *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A scratch repository of its own, with one commit (never the project's repository)."""
    git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("print('train')\n")
    git(tmp_path, "add", "train.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_git_commit_names_the_commit_and_tracked_changes_only(checkout):
    head = git(checkout, "rev-parse", "HEAD")
    assert provenance.git_commit(str(checkout)) == {"commit": head, "uncommitted_changes": False}
    (checkout / "notes.txt").write_text("untracked files are not changes to the scripts")
    assert provenance.git_commit(str(checkout)) == {"commit": head, "uncommitted_changes": False}
    (checkout / "train.py").write_text("print('edited')\n")
    assert provenance.git_commit(str(checkout)) == {"commit": head, "uncommitted_changes": True}


def test_outside_git_or_before_the_first_commit_there_is_no_commit(tmp_path):
    assert provenance.git_commit(str(tmp_path)) is None
    git(tmp_path, "init", "-q")
    assert provenance.git_commit(str(tmp_path)) is None


def test_by_default_it_is_the_commit_of_these_scripts():
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("the tests run outside a git checkout")
    found = provenance.git_commit()
    assert found is not None and found["commit"] == git(REPO_ROOT, "rev-parse", "HEAD")
    assert isinstance(found["uncommitted_changes"], bool)


def test_the_repository_root_is_the_folder_that_holds_the_package():
    from finetune.observe import provenance

    assert os.path.samefile(provenance.REPO_ROOT, REPO_ROOT)
