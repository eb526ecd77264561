"""The shape of the code: no import cycles (imports inside functions count), modules of bounded size with type
hints, each sub-package's index naming its modules, a test file for every module, the two training scripts'
main() bodies equal but for their model-specific lines, and the linter's verdict."""
import ast
import difflib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "finetune"
TOP_LEVEL = ["train_llama2.py", "train_baichuan2_13b.py", "prepare_dataset.py", "inference.py", "modeling_baichuan.py"]


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    paths = sorted(PACKAGE.rglob("*.py")) + [ROOT / name for name in TOP_LEVEL]
    return {module_name(path): path for path in paths}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports, at the top or inside a function. `from finetune import x`
    imports the submodule finetune.x when there is one, else the package itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found & known


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    known = {"a", "b"}
    graph = {"a": imported_modules(tmp_path / "a.py", known), "b": imported_modules(tmp_path / "b.py", known)}
    assert find_cycle(graph) == ["a", "b", "a"]


MOST_LINES = 450
# The model file follows the layout of the upstream model it reimplements, one class per part of the model.
LONG_MODULES_ALLOWED = {"modeling_baichuan"}


def modules_past(most_lines: int) -> dict[str, int]:
    counts = {name: len(path.read_text().splitlines()) for name, path in our_modules().items()}
    return {name: count for name, count in counts.items() if count > most_lines and name not in LONG_MODULES_ALLOWED}


def test_no_module_is_past_450_lines():
    assert not modules_past(MOST_LINES), f"split these by concern: {modules_past(MOST_LINES)}"


def test_the_line_limit_finds_a_long_module():
    assert "finetune.distributed.backend" in modules_past(100)


def package_modules() -> dict[Path, list[str]]:
    """{sub-package folder: the names of its modules}, the package itself included."""
    folders = [PACKAGE] + sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))
    return {folder: sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") for folder in folders}


def unlisted_modules(folder: Path, modules: list[str]) -> list[str]:
    """Modules (and, for the package, sub-packages) that the folder's __init__ docstring does not name."""
    first = ast.parse((folder / "__init__.py").read_text()).body[0]
    index = first.value.value if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else ""
    named = set(re.findall(r"^ +([a-z_]+(?:/|(?:, *[a-z_]+)*))", index, re.M))  # indented entries only
    words = {w.strip().rstrip("/") for entry in named for w in entry.split(",")}
    expected = modules + ([p.parent.name for p in folder.glob("*/__init__.py")] if folder == PACKAGE else [])
    return [name for name in expected if name not in words]


def test_every_sub_package_index_names_each_of_its_modules():
    missing = {str(folder.relative_to(ROOT)): unlisted_modules(folder, modules)
               for folder, modules in package_modules().items()}
    assert not any(missing.values()), {folder: names for folder, names in missing.items() if names}


def test_the_index_check_finds_an_unlisted_module(tmp_path):
    (tmp_path / "__init__.py").write_text('"""Index.\n\n    alpha   the first\n"""\n')
    assert unlisted_modules(tmp_path, ["alpha", "beta"]) == ["beta"]


def untested_modules() -> list[str]:
    """Modules of the package without a test file of their own name in the tests folder of their sub-package
    (finetune/plan/probe.py: tests/plan/test_probe*.py; finetune/args.py: tests/test_args*.py)."""
    missing = []
    for folder, modules in package_modules().items():
        tests = ROOT / "tests" / folder.relative_to(PACKAGE)
        missing += [f"{folder.relative_to(ROOT)}/{name}.py" for name in modules
                    if not list(tests.glob(f"test_{name}.py")) + list(tests.glob(f"test_{name}_*.py"))]
    return missing


def test_every_module_has_a_test_file_named_after_it():
    assert not untested_modules(), untested_modules()


def public_functions(tree: ast.Module):
    """(name, node) of a module's public functions and of the public methods (and __init__) of its public
    classes."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and (not item.name.startswith("_") or item.name == "__init__"):
                    yield f"{node.name}.{item.name}", item


def lacking_type_hints(source: str) -> list[str]:
    """Public functions of `source` with a parameter or the return value not annotated (__init__ returns None)."""
    lacking = []
    for name, function in public_functions(ast.parse(source)):
        arguments = function.args
        parameters = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
                      arguments.kwarg]
        if any(p is not None and p.annotation is None and p.arg not in ("self", "cls") for p in parameters) or (
                function.returns is None and function.name != "__init__"):
            lacking.append(name)
    return lacking


def test_public_functions_of_the_package_have_type_hints():
    lacking = {module_name(path): lacking_type_hints(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}
    assert not any(lacking.values()), {module: names for module, names in lacking.items() if names}


def test_the_type_hint_check_finds_a_missing_hint():
    source = "def f(a: int) -> int:\n    return a\n\nclass C:\n    def g(self, b) -> None:\n        pass\n" \
             "\n    def _private(self, c):\n        pass\n\ndef h(*args: int):\n    pass\n"
    assert lacking_type_hints(source) == ["C.g", "h"]


def main_body(script: str) -> list[str]:
    tree = ast.parse((ROOT / script).read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    return ast.unparse(main).splitlines()


# The one thing main() may do differently in the two scripts: load the model with an attention of its own
# (Llama's packed attention). Anything else is a fix made in one script and forgotten in the other.
MODEL_SPECIFIC = re.compile(r"attn_implementation='[^']*', ")


def differing_lines(first: list[str], second: list[str]) -> list[str]:
    first, second = ([MODEL_SPECIFIC.sub("", line) for line in body] for body in (first, second))
    return [line for line in difflib.unified_diff(first, second, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_the_training_scripts_main_bodies_differ_only_in_model_specific_lines():
    differences = differing_lines(main_body("train_llama2.py"), main_body("train_baichuan2_13b.py"))
    assert not differences, "\n".join(differences)
    assert any(MODEL_SPECIFIC.search(line) for line in main_body("train_llama2.py"))


def test_a_change_made_in_one_script_only_is_caught():
    body = main_body("train_llama2.py")
    changed = [line.replace("clip_grad_norm(", "clip_grad_norm_typo(") for line in body]
    assert differing_lines(body, changed)


@pytest.mark.skipif(shutil.which("ruff") is None and subprocess.run(
    [sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0, reason="ruff not installed")
def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
