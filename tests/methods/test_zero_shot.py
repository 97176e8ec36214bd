"""The zero-shot baseline's prompt: the task's instruction, or the bare question (chat models)."""
from __future__ import annotations

import pytest

from latentreason.config import ConfigError, load_run_config
from latentreason.recipes import build_method
from tests.conftest import needs_data, tiny_run

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _prompt_text(tmp_path, prompt: str, chat: bool) -> tuple[str, str, str]:
    cfg = tiny_run(tmp_path, "zero-shot", data={"task": "gsm8k-aug", "options": {}})
    cfg["method"]["prompt"] = prompt
    run = load_run_config(base=cfg)
    method = build_method(run)
    if chat:
        method.loaded.tokenizer.chat_template = CHAT_TEMPLATE
    ex = method.task.load("valid", limit=1)[0]
    text = method.loaded.tokenizer.decode(method.prompt_ids([ex])[0])
    return text, method.task.instruction, ex.question


@needs_data
@pytest.mark.parametrize("prompt,chat,with_instruction", [
    ("auto", True, False),         # chat model: the bare question
    ("auto", False, True),         # plain LM: the instruction tells it the format
    ("instruction", True, True),
    ("bare", False, False),
])
def test_zero_shot_prompt(tmp_path, prompt, chat, with_instruction):
    text, instruction, question = _prompt_text(tmp_path, prompt, chat)
    assert question in text
    assert (instruction in text) == with_instruction
    assert text.startswith("<|user|>") == chat


def test_unknown_prompt_style_is_refused():
    with pytest.raises(ConfigError, match="method.prompt='plain', must be auto, instruction or bare"):
        load_run_config(overrides=["method.name=zero-shot", "method.prompt=plain"])
