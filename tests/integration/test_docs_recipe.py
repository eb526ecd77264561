"""docs/recipes.md, "Adding a recipe": its steps followed literally in a copy of the repository."""
import pytest
import json
import re
import shlex

from conftest import PYTHON, REPO_ROOT, repository_copy, run_script


def docs_section(title):
    text = (REPO_ROOT / "docs" / "recipes.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def code_blocks(section, language):
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_adding_a_recipe_works_as_the_docs_say(tmp_path):
    section = docs_section("Adding a recipe")
    recipe_code = code_blocks(section, "python")[0]
    commands = [line for line in code_blocks(section, "bash")[0].splitlines() if line.strip()]

    repo = repository_copy(tmp_path / "repo")

    # "both in `finetune/data/recipes.py` ... Add them at the end of that file"
    assert "`finetune/data/recipes.py`" in section and "Add\nthem at the end of that file" in section
    recipes = repo / "finetune" / "data" / "recipes.py"
    recipes.write_text(recipes.read_text() + "\n\n" + recipe_code)

    # "a JSON-lines file of your own with question and answer fields"
    places = ["the station", "the library", "the market", "the harbour", "the museum", "the school"]
    directions = ["north of the river", "next to the park", "behind the town hall", "on the main street"]
    with open(repo / "my_qa.jsonl", "w") as f:
        for index in range(600):
            place, where = places[index % len(places)], directions[index % len(directions)]
            f.write(json.dumps({"question": f"Where is {place}?", "answer": f"{place.capitalize()} is {where}."}) + "\n")

    outputs = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        result = run_script(PYTHON, *argv[1:], cwd=repo, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        outputs.append(result.stdout)
    assert (repo / "qa_dataset" / "dataset_dict.json").exists()
    assert (repo / "qa_demo_output" / "model.safetensors").exists()
    assert "Where is the station?" in outputs[-1] and "--- greedy ---" in outputs[-1]


@pytest.mark.slow
def test_demo_without_bundled_data_for_a_recipe_says_what_to_pass(tmp_path):
    result = run_script(PYTHON, "-c", "import sys, prepare_dataset as p; "
                        "p.RECIPES['qa'] = dict(p.RECIPES['llama2']); sys.argv = ['prepare_dataset.py', 'qa', "
                        f"'--demo', '--save-path', {str(tmp_path / 'out')!r}]; p.main()")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --demo has no bundled sample data for recipe 'qa'")
