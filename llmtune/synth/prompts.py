"""Prompt templates are Jinja files (prompts/README.md lists them); a rendered prompt records name and hash."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from llmtune.errors import LlmtuneError

# The repository's prompts/ folder (installed next to the package by an editable install).
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"


class PromptError(LlmtuneError, ValueError):
    """A template that cannot be found or rendered; the message names the file."""


@dataclass(frozen=True)
class Prompt:
    name: str
    path: Path
    sha256: str
    source: str

    def render(self, **variables: Any) -> str:
        try:
            return _environment().from_string(self.source).render(**variables).strip()
        except TemplateError as err:
            raise PromptError(f"{self.path}: cannot render: {err}") from None

    @property
    def provenance(self) -> dict[str, str]:
        return {"template": self.name, "template_sha256": self.sha256[:16]}


@functools.cache
def _environment() -> SandboxedEnvironment:
    # Sandboxed: a shared template must not reach Python internals; strict: a typo in a variable is an error.
    environment = SandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    # `capitalize` would lower-case the rest ("ACE inhibitor" -> "Ace inhibitor"); `sentence` does not.
    environment.filters["sentence"] = lambda text: str(text)[:1].upper() + str(text)[1:]
    return environment


def render_string(source: str, where: str, **variables: Any) -> str:
    """Render a template string from a data file (fact templates); errors name `where`."""
    try:
        return _environment().from_string(source).render(**variables).strip()
    except TemplateError as err:
        raise PromptError(f"{where}: cannot render {source!r}: {err}") from None


def load_prompt(name_or_path: str) -> Prompt:
    """A template by name (prompts/NAME.jinja) or by path (a file ending in .jinja)."""
    path = Path(name_or_path) if name_or_path.endswith(".jinja") else PROMPTS_DIR / f"{name_or_path}.jinja"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPTS_DIR.glob("*.jinja"))
        raise PromptError(f"prompt template {name_or_path!r} not found ({path}); known: {', '.join(known)}")
    source = path.read_text()
    try:
        _environment().parse(source)
    except TemplateError as err:
        raise PromptError(f"{path}: not a valid Jinja template: {err}") from None
    return Prompt(path.stem, path, hashlib.sha256(source.encode()).hexdigest(), source)
