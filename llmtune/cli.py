"""The `llmtune` command. Heavy libraries (torch, transformers, trl) are imported inside commands, so
`llmtune --help` and `llmtune validate` start in well under a second."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from llmtune.errors import LlmtuneError

app = typer.Typer(
    help="Parameter-efficient fine-tuning: recipe in, evaluated adapter out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Offline builtin models (tiny test model, SmolLM2-135M-Instruct).", no_args_is_help=True)
app.add_typer(models_app, name="models")

err_console = Console(stderr=True)
console = Console()

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe field, e.g. --set train.learning_rate=1e-4 (repeatable)."),
]


def _setup_logging() -> None:
    # Only the main process talks under torchrun/accelerate; the other ranks log warnings and errors.
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    if err_console.is_terminal:
        handler: logging.Handler = RichHandler(console=err_console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # files and pipes get whole lines: rich would wrap paths mid-word
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at import that the optional `kernels` package is absent; its own CPU path is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Validate a recipe and print it fully resolved (defaults filled in, paths absolute)."""
    from llmtune.config import load_recipe, recipe_to_yaml

    resolved = load_recipe(recipe, set_)
    typer.echo(recipe_to_yaml(resolved), nl=False)  # plain: rich would wrap long paths and break the YAML
    err_console.print(f"[green]ok[/green] {recipe}")


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start again: replace a finished run and its checkpoints in output_dir.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Require a checkpoint to resume from (by default resume if one exists).")
    ] = False,
    force_resume: Annotated[
        bool, typer.Option(help="Resume even though the recipe or data changed since the checkpoint.")
    ] = False,
) -> None:
    """Train an adapter as the recipe says (also under `accelerate launch -m llmtune train` or torchrun).

    An interrupted run resumes from its newest complete checkpoint when started again."""
    from llmtune.config import load_recipe

    resolved = load_recipe(recipe, set_)  # before any heavy import: a bad recipe fails in milliseconds
    _setup_logging()
    if resolved.method in ("dpo", "orpo", "kto"):
        from llmtune.train import preference as method
    else:
        from llmtune.train import sft as method

    mode = "require" if resume else "auto"
    out = method.main(resolved, overwrite=overwrite, resume=mode, force_resume=force_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        if out is None:
            console.print(f"[yellow]stopped[/yellow]: checkpoint saved; run the same command to resume ({recipe})")
        else:
            console.print(f"[green]done[/green] {out}")


@models_app.command("list")
def models_list() -> None:
    """Show the builtin models and whether they are built in the cache."""
    from llmtune.builtin_models import builtin_names, cache_dir

    for name in builtin_names():
        folder = cache_dir() / "models" / name
        state = "ready" if (folder / "config.json").is_file() else "not built"
        console.print(f"builtin:{name:<24} {state:<10} {folder}")


@models_app.command("build")
def models_build(name: Annotated[str, typer.Argument(help="tiny | smollm2-135m-instruct")]) -> None:
    """Build a builtin model into the cache (the tiny random model, or SmolLM2 imported from its GGUF)."""
    _setup_logging()
    from llmtune.builtin_models import ensure_builtin

    console.print(str(ensure_builtin(name.removeprefix("builtin:"))))


def main() -> None:
    try:
        app()
    except LlmtuneError as err:
        err_console.print(Text.assemble(("error: ", "bold red"), str(err)), highlight=False, soft_wrap=True)
        sys.exit(2)
