"""Recipes: how a raw example becomes the text the model learns from. One small prompt-building function per
recipe; copy one and edit its strings to change the prompt (prepare_dataset.py RECIPE uses them, and so do the
training scripts' --demo and inference.py's prompts).

A recipe function splits an example into four strings:
    head      fixed prompt text at the start                (always kept)
    body      the long, cuttable part (article, question)   (cut from its end when the example is too long)
    tail      the rest of the prompt                        (always kept)
    response  what the model should learn to write          (cut only if it alone does not fit)
head + body + tail + response is exactly the text the model sees, followed by the EOS token. Put part boundaries
just before a space or a newline so that tokenizing the parts gives the same tokens as tokenizing the whole text.
"""
from finetune import demo
from finetune.errors import FinetuneError


# ----------------------------------------------------------------------------------------------
# Recipes: one prompt-building function each. Edit these to change the prompt format.
# ----------------------------------------------------------------------------------------------
def build_llama2_prompt(example: dict) -> dict[str, str]:
    """Summarisation prompt: "[SUMMARIZE] {article} [/SUMMARIZE]\\n{highlights}"."""
    return {
        "head": "[SUMMARIZE]",
        "body": " " + example["article"],
        "tail": " [/SUMMARIZE]\n",
        "response": example["highlights"],
    }


def build_baichuan2_prompt(example: dict) -> dict[str, str]:
    """Customer-support prompt: "[INST] {instruction} \\n Category is {category} \\n Intent is {intent} [/INST]\\n{response}"."""
    return {
        "head": "[INST]",
        "body": " " + example["instruction"],
        "tail": f" \n Category is {example['category']} \n Intent is {example['intent']} [/INST]\n",
        "response": example["response"],
    }


RECIPES = {
    "llama2": {
        "build_prompt": build_llama2_prompt,
        "columns": ("article", "highlights"),
        "model": "meta-llama/Llama-2-13b-hf",
        "dataset": "cnn_dailymail",
        "dataset_config": "3.0.0",
        "save_path": "./llama2_dataset",
    },
    "baichuan2": {
        "build_prompt": build_baichuan2_prompt,
        "columns": ("instruction", "category", "intent", "response"),
        "model": "baichuan-inc/Baichuan2-13B-Base",
        "dataset": "bitext/Bitext-customer-support-llm-chatbot-training-dataset",
        "dataset_config": None,
        "save_path": "./baichuan2_dataset",
    },
    # Conversations: no prompt function; the layout is the model's own chat format (--chat-format).
    "chat": {
        "columns": ("messages",),
        "model": "meta-llama/Llama-2-13b-chat-hf",
        "dataset": None,
        "dataset_config": None,
        "save_path": "./chat_dataset",
        "demo_data": demo.DEMO_CHAT_FILE,
    },
}


def demo_sample_file(recipe_name: str) -> str:
    """The bundled sample data of a recipe (--demo); other recipes bring their own --dataset-name-or-path."""
    if RECIPES[recipe_name].get("demo_data"):
        return RECIPES[recipe_name]["demo_data"]
    if recipe_name not in demo.DEMO_SAMPLE_FILES:
        columns = ", ".join(RECIPES[recipe_name]["columns"])
        raise FinetuneError(f"--demo has no bundled sample data for recipe '{recipe_name}'; pass "
                           f"--dataset-name-or-path with your own data (columns {columns})")
    return demo.DEMO_SAMPLE_FILES[recipe_name]


def demo_dataset(recipe_name: str, block_size: int) -> str:
    """The prepared bundled sample of a recipe for `--demo` training runs, built once and cached."""
    return demo.ensure_demo_dataset(recipe_name, RECIPES[recipe_name], block_size)
