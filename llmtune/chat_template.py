"""Find a chat template that can mark assistant tokens for the loss, without changing what the model sees.

Most shipped templates have no `{% generation %}` markers, so `return_assistant_tokens_mask` yields nothing.
We swap in a training variant only when it renders byte-identically to the model's own template on probe
conversations: TRL's known training templates first, then the ones under `llmtune/templates/`.
"""

from __future__ import annotations

from importlib import resources

from transformers import PreTrainedTokenizerBase

from llmtune.errors import LlmtuneError

_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
]


class ChatTemplateError(LlmtuneError, ValueError):
    """The model's template cannot be used for assistant-only loss."""


def has_generation_markers(template: str) -> bool:
    from trl.chat_template_utils import has_generation_markers as trl_has_markers

    return trl_has_markers(template)


def shipped_templates() -> dict[str, str]:
    folder = resources.files("llmtune") / "templates"
    return {p.name: p.read_text() for p in folder.iterdir() if p.name.endswith("_training.jinja")}


def renders_identically(tokenizer: PreTrainedTokenizerBase, original: str, candidate: str) -> bool:
    """Same text for every probe, with and without a generation prompt (markers do not render)."""
    for messages in _PROBES:
        for prompt_only in (False, True):
            convo = messages[:-1] if prompt_only else messages
            kwargs = {"tokenize": False, "add_generation_prompt": prompt_only}
            try:
                a = tokenizer.apply_chat_template(convo, chat_template=original, **kwargs)
                b = tokenizer.apply_chat_template(convo, chat_template=candidate, **kwargs)
            except Exception:  # a template that raises on a probe (e.g. no system role) is no match
                return False
            if a != b:
                return False
    return True


def training_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template to tokenize training data with, so that assistant turns can be masked."""
    original = tokenizer.chat_template
    if not original:
        raise ChatTemplateError(
            "the tokenizer has no chat template: set `model.chat_template: FILE.jinja`, or `data.loss_on: all`"
        )
    if has_generation_markers(original):
        return original
    for candidate in _candidates(tokenizer):
        if renders_identically(tokenizer, original, candidate):
            return candidate
    raise ChatTemplateError(
        "the chat template has no {% generation %} markers and no known training variant renders it identically, "
        "so assistant tokens cannot be told apart: give a template with markers (`model.chat_template: FILE.jinja`) "
        "or train on every token (`data.loss_on: all`)"
    )


def stop_token_trained(tokenizer: PreTrainedTokenizerBase, template: str) -> bool:
    """Whether the assistant's end-of-turn token falls inside the loss mask (else the model never learns to stop)."""
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    return is_chat_template_stop_token_trained(tokenizer, chat_template=template)


def _candidates(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    from trl.chat_template_utils import get_training_chat_template

    found: list[str] = []
    try:
        trl_template = get_training_chat_template(tokenizer)
    except ValueError:  # TRL does not know this template
        trl_template = None
    if trl_template:
        found.append(trl_template)
    found.extend(shipped_templates().values())
    return found
