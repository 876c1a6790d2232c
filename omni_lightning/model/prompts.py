"""The text around an item's content: the embedded presets' own templates, or the backbone's chat template.

``OmniConfig.prompt_format`` chooses:

* ``"template"`` (the tiny and small presets): ``query_template`` (with ``{instruction}``) for queries,
  ``candidate_template`` otherwise: plain format strings around ``{content}``.
* ``"chat"`` (real checkpoints; ``init-model --backbone`` sets it when the checkpoint ships a chat template): the
  backbone's own chat template (Qwen3-VL's) renders a system turn holding the instruction (candidates:
  ``default_instruction``), a user turn holding the content (text, or the media placeholders) and the assistant
  generation prompt; the embedding is the last token's hidden state, as for Qwen's VL embedding models::

      <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n
"""

from __future__ import annotations

from typing import Any

from omni_lightning.model.config import OmniConfig

PROMPT_FORMATS = ("template", "chat")


def chat_template_of(processor: Any) -> str | None:
    """The chat template a backbone processor (or its tokenizer) carries, if any."""
    for obj in (processor, getattr(processor, "tokenizer", None)):
        tmpl = getattr(obj, "chat_template", None)
        if isinstance(tmpl, dict):
            tmpl = tmpl.get("default")
        if isinstance(tmpl, str) and tmpl:
            return tmpl
    return None


def render_prompt(config: OmniConfig, processor: Any, content: str, instruction: str | None) -> str:
    """The text of one item (see the module docstring); ``processor``: the backbone's processor."""
    if config.prompt_format == "template":
        if instruction is None:
            return config.candidate_template.format(content=content)
        return config.query_template.format(instruction=instruction, content=content)
    template = chat_template_of(processor)
    if template is None:
        raise ValueError("prompt_format 'chat' needs the backbone's chat template (chat_template.jinja / "
                         "chat_template.json in the model directory); none found. Set prompt_format: template "
                         "in omni_config.json, or copy the checkpoint's chat template into the model directory")
    messages = [{"role": "system", "content": instruction if instruction is not None else config.default_instruction},
                {"role": "user", "content": content}]
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


__all__ = ["PROMPT_FORMATS", "chat_template_of", "render_prompt"]
