"""finetune/data/recipes.py: prompt parts join to the documented text; --demo sample data found or refused."""
import json

import pytest

from finetune import demo
from finetune.data import recipes
from finetune.data.preparation import full_text
from finetune.errors import FinetuneError

PROMPT_RECIPES = [name for name, recipe in recipes.RECIPES.items() if "build_prompt" in recipe]


def sample_rows(name, count=5):
    with open(demo.DEMO_SAMPLE_FILES[name], encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(count))]


def expected_text(name, row):
    """The layouts the recipes' docstrings give, written out independently."""
    if name == "llama2":
        return f"[SUMMARIZE] {row['article']} [/SUMMARIZE]\n{row['highlights']}"
    return (f"[INST] {row['instruction']} \n Category is {row['category']} \n Intent is {row['intent']} [/INST]\n"
            f"{row['response']}")


def test_every_prompt_recipe_has_bundled_sample_data():
    assert sorted(PROMPT_RECIPES) == ["baichuan2", "llama2"]


@pytest.mark.parametrize("name", PROMPT_RECIPES)
def test_the_parts_join_to_the_documented_text(name):
    build = recipes.RECIPES[name]["build_prompt"]
    for row in sample_rows(name):
        parts = build(row)
        assert set(parts) == {"head", "body", "tail", "response"}
        assert parts["head"] + parts["body"] + parts["tail"] + parts["response"] == expected_text(name, row)
        assert full_text(parts) == expected_text(name, row)  # what prepare_dataset.py tokenizes
        # Part boundaries fall just before a space or newline, so the parts tokenize as the whole text does.
        assert parts["body"][0] == " " and parts["tail"][0] in " \n"


@pytest.mark.parametrize("name", PROMPT_RECIPES)
def test_a_recipe_reads_exactly_the_columns_it_names(name):
    recipe = recipes.RECIPES[name]
    row = {column: f"<{column}>" for column in recipe["columns"]}
    text = full_text(recipe["build_prompt"](row))
    assert all(f"<{column}>" in text for column in recipe["columns"])
    for column in recipe["columns"]:
        with pytest.raises(KeyError):
            recipe["build_prompt"]({key: value for key, value in row.items() if key != column})


def test_the_body_is_the_long_part_and_the_response_is_last():
    parts = recipes.build_llama2_prompt({"article": "Long story.", "highlights": "Short."})
    assert parts == {"head": "[SUMMARIZE]", "body": " Long story.", "tail": " [/SUMMARIZE]\n", "response": "Short."}
    parts = recipes.build_baichuan2_prompt({"instruction": "Where is my order?", "category": "ORDER",
                                            "intent": "track_order", "response": "Here."})
    assert parts["body"] == " Where is my order?" and parts["response"] == "Here."
    assert parts["tail"] == " \n Category is ORDER \n Intent is track_order [/INST]\n"


def test_demo_sample_files_are_the_bundled_ones():
    assert recipes.demo_sample_file("llama2") == demo.DEMO_SAMPLE_FILES["llama2"]
    assert recipes.demo_sample_file("baichuan2") == demo.DEMO_SAMPLE_FILES["baichuan2"]
    assert recipes.demo_sample_file("chat") == demo.DEMO_CHAT_FILE


def test_a_recipe_without_sample_data_is_refused_for_demo_naming_its_columns(monkeypatch):
    monkeypatch.setitem(recipes.RECIPES, "faq", {"build_prompt": recipes.build_llama2_prompt,
                                                  "columns": ("question", "answer")})
    with pytest.raises(FinetuneError, match=r"^--demo has no bundled sample data for recipe 'faq'; pass "
                                            r"--dataset-name-or-path with your own data \(columns question, answer\)$"):
        recipes.demo_sample_file("faq")
