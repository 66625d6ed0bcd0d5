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
    for noisy in ("httpx", "httpx2", "openai", "absl", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at import that the optional `kernels` package is absent; its own CPU path is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Validate a recipe and print it fully resolved (defaults filled in, paths absolute)."""
    import yaml

    from llmtune.config import load_recipe, read_raw_recipe, recipe_to_yaml

    raw = read_raw_recipe(recipe, set_)
    if "sweep" in raw:
        from llmtune.sweep.recipe import load_sweep

        section = load_sweep(recipe, set_).section
        err_console.print(f"sweep: {section.strategy}, {len(section.space)} fields, {section.trials} trials")
    if "synth" in raw:
        from llmtune.synth.recipe import load_synth_recipe

        section = load_synth_recipe(recipe, set_)
        text = yaml.safe_dump({"synth": section.model_dump(mode="json")}, sort_keys=False)
    elif "eval" in raw:
        from llmtune.eval.recipe import load_eval_recipe

        text = yaml.safe_dump({"eval": load_eval_recipe(recipe, set_).model_dump(mode="json")}, sort_keys=False)
    else:
        text = recipe_to_yaml(load_recipe(recipe, set_))
    typer.echo(text, nl=False)  # plain: rich would wrap long paths and break the YAML
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
    elif resolved.task == "classification":
        from llmtune.train import classification as method
    else:
        from llmtune.train import sft as method

    mode = "require" if resume else "auto"
    out = method.main(resolved, overwrite=overwrite, resume=mode, force_resume=force_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        if out is None:
            console.print(f"[yellow]stopped[/yellow]: checkpoint saved; run the same command to resume ({recipe})")
        else:
            console.print(f"[green]done[/green] {out}")


@app.command()
def sweep(
    recipe: RecipeArg,
    set_: SetOpt = None,
    trials: Annotated[int | None, typer.Option(help="Finished trials to reach (default: sweep.trials).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start the study again: delete sweep.output_dir first.")] = False,
) -> None:
    """Search hyperparameters as the recipe's `sweep` section says (grid, random or TPE on Optuna, with
    pruning); each trial is an ordinary run folder. A killed sweep continues where it stopped; two terminals
    can work on one study. Writes the trials table, plots, and the best trial's recipe."""
    from llmtune.sweep.recipe import load_sweep

    loaded = load_sweep(recipe, set_)  # every searched range checked before any trial
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise typer.BadParameter("`llmtune sweep` runs its trials in one process; start it without accelerate")
    _setup_logging()
    from llmtune.sweep.report import sweep_summary
    from llmtune.sweep.run import SweepInterrupted, run_sweep

    try:
        study = run_sweep(loaded, overwrite=overwrite, trials=trials)  # writes the table, plots, best recipe
    except SweepInterrupted as stop:
        console.print(f"[yellow]stopped[/yellow]: {stop}")
        return
    _print_sweep_summary(loaded, sweep_summary(loaded, study))


def _print_sweep_summary(loaded, summary: dict) -> None:
    out = loaded.section.output_dir
    console.print(f"{summary['trials']} trials: {out / 'results.md'}, {out / 'trials.csv'}", highlight=False,
                  soft_wrap=True)
    best = summary["best"]
    if best is None:
        console.print("[yellow]no trial completed[/yellow]")
        return
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    console.print(f"best: trial {best['trial']}, {loaded.section.objective.metric} = {best['value']:.6g} ({values})",
                  highlight=False, soft_wrap=True)
    console.print(f"[green]done[/green] train it with: llmtune train {best['recipe']}", highlight=False,
                  soft_wrap=True)


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    from_: Annotated[str | None, typer.Option("--from", help="Rerun this stage and every later one.")] = None,
    only: Annotated[str | None, typer.Option(help="Rerun just this stage (the ones before it must have run).")] = None,
    force: Annotated[bool, typer.Option(help="Rerun every stage, changed or not.")] = False,
    push: Annotated[bool, typer.Option(help="The publish stage uploads to publish.repo_id (token from HF_TOKEN).")]
    = False,
    dry_run: Annotated[
        bool, typer.Option(help="Check everything that needs no network or accelerator (schema, paths, accelerate "
                                "config, memory estimate) and stop.")
    ] = False,
) -> None:
    """Run a pipeline recipe: synth -> sft -> prefs -> dpo -> eval -> merge -> publish, each stage the same
    code as its own command. Unchanged stages are skipped; a killed run continues where it stopped."""
    from llmtune.pipeline.recipe import STAGES, load_pipeline

    for name in filter(None, (from_, only)):
        if name not in STAGES:
            raise typer.BadParameter(f"{name!r}: stages are {', '.join(STAGES)}")
    if from_ and only:
        raise typer.BadParameter("give --from or --only, not both")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise typer.BadParameter("`llmtune run` runs in one process and launches its training stages itself: set "
                                 "`pipeline.accelerate_config` instead of starting it under accelerate/torchrun")
    pipeline = load_pipeline(recipe, set_)  # every stage validated before any runs
    if dry_run:
        from llmtune.pipeline.dryrun import dry_run as check

        for line in check(pipeline):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(f"[green]ok[/green] {recipe}: {' -> '.join(pipeline.stages)}")
        return
    _setup_logging()
    from llmtune.pipeline.display import delta_lines, stage_table
    from llmtune.pipeline.run import Selection, run_pipeline
    from llmtune.progress import WorkProgress

    def show(outcomes, running) -> None:
        err_console.print(stage_table(pipeline.stages, outcomes, running))

    with WorkProgress(err_console) as progress:
        outcomes = run_pipeline(pipeline, Selection(from_, only, force), push, progress, show)
    console.print(stage_table(pipeline.stages, outcomes, None))
    for line in delta_lines(outcomes):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"[green]done[/green] {pipeline.output_dir}")


@app.command()
def synth(
    recipe: RecipeArg,
    set_: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start again: delete the output folder's journal and outputs first.")
    ] = False,
) -> None:
    """Synthesize training data as the recipe's `synth` section says: teacher methods and fact templates,
    validated, filtered and decontaminated against the eval sets. A killed run resumes where it stopped."""
    from llmtune.synth.recipe import load_synth_recipe

    section = load_synth_recipe(recipe, set_)
    _setup_logging()
    from llmtune.progress import WorkProgress
    from llmtune.synth.run import synthesize

    with WorkProgress(err_console) as progress:
        report = synthesize(section, overwrite=overwrite, progress=progress)
    _print_synth_summary(report)
    console.print(f"[green]done[/green] {section.output_dir}")


def _print_synth_summary(report: dict) -> None:
    from rich.table import Table

    table = Table(title="synthesis", show_header=True)
    table.add_column("method")
    table.add_column("generated", justify="right")
    table.add_column("rejected at generation", justify="right")
    table.add_column("kept", justify="right")
    kept = report["kept"]["sft_by_method"] | {"preferences": report["kept"]["preferences"]}
    for method, count in report["generated"].items():
        rejected = sum(report["rejected_at_generation"].get(method, {}).values())
        table.add_row(method, str(count), str(rejected), str(kept.get(method, 0)))
    console.print(table)
    removed = ", ".join(f"{name} {count}" for name, count in report["removed_by_filter"].items()) or "none"
    tokens = report["tokens"]
    console.print(
        f"removed by filters: {removed}; decontaminated: {report['decontaminated']}; "
        f"tokens: {tokens.get('prompt_tokens', 0)} prompt + {tokens.get('completion_tokens', 0)} completion; "
        f"{report['new_items']} new items in {report['wall_s']:.1f} s",
        highlight=False,
    )


@app.command("eval")
def eval_(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML with an `eval:` section.")] = None,
    set_: SetOpt = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="NAME=PATH (a base model, run folder or merged model); repeatable; "
                                     "the first is the baseline. Without a recipe."),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option("--task", help="KIND:FILE with KIND mcq, generative or classification "
                                    "(e.g. mcq:data/eval/mcq.jsonl); repeatable. Without a recipe."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write (without a recipe).")] = None,
    harness: Annotated[
        str | None, typer.Option(help="Also run these lm-eval tasks (comma-separated) on every model, into the report.")
    ] = None,
    harness_include: Annotated[
        Path | None, typer.Option(help="A folder of extra lm-eval task YAML (e.g. from --export-harness).")
    ] = None,
    export_harness: Annotated[
        Path | None, typer.Option(help="Write the eval tasks as lm-eval task YAML into this folder and stop.")
    ] = None,
) -> None:
    """Evaluate models on the same items: metrics with CIs, paired tests vs the baseline, per category,
    report.json/.md/.html. Resumes per item when run again."""
    from llmtune.eval.recipe import load_eval_recipe

    if recipe is not None:
        if model or task or output:
            raise typer.BadParameter("give a recipe, or --model/--task/--output, not both")
        section = load_eval_recipe(recipe, set_)
    else:
        section = _eval_from_flags(model or [], task or [], output or export_harness)
    _setup_logging()
    if export_harness is not None:
        from llmtune.eval.harness import export_tasks

        for path in export_tasks(section.tasks, export_harness):
            console.print(str(path))
        console.print(f"[green]exported[/green]: lm_eval --include_path {export_harness} --tasks TASK ...")
        return
    from llmtune.eval.run import evaluate
    from llmtune.progress import WorkProgress

    tasks = [t.strip() for t in harness.split(",") if t.strip()] if harness else None
    with WorkProgress(err_console) as progress:
        report = evaluate(section, progress=progress, harness_tasks=tasks, harness_include=harness_include)
    for task_info in report["tasks"]:
        metric = task_info["primary_metric"]
        for name, result in report["results"][task_info["name"]].items():
            value = result["metrics"][metric]
            compared = {c["metric"]: c for c in report["comparisons"][task_info["name"]].get(name, [])}
            line = (f"{task_info['name']:<20} {name:<16} {metric} {value['mean']:.3f} "
                    f"[{value['low']:.3f}, {value['high']:.3f}]")
            if metric in compared:
                c = compared[metric]
                line += f"  {c['difference']:+.3f} vs {report['baseline']} (p={c['p_value']:.3g})"
            console.print(line, highlight=False, soft_wrap=True)
    console.print(f"[green]done[/green] {section.output_dir / 'report.html'}")


def _eval_from_flags(models: list[str], tasks: list[str], output: Path | None):
    from llmtune.eval.recipe import EvalSection, resolve_eval_paths

    if not models or not tasks or output is None:
        raise typer.BadParameter("without a recipe, give --model NAME=PATH (one or more), --task KIND:FILE and -o DIR")
    parsed_models = []
    for item in models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--model {item!r}: expected NAME=PATH")
        parsed_models.append({"name": name, "path": path})
    parsed_tasks = []
    for item in tasks:
        kind, sep, path = item.partition(":")
        if not sep or kind not in ("mcq", "generative", "classification"):
            raise typer.BadParameter(f"--task {item!r}: expected mcq:FILE, generative:FILE or classification:FILE")
        parsed_tasks.append({"name": Path(path).stem, "kind": kind, "path": path})
    from pydantic import ValidationError

    from llmtune.config import RecipeError

    try:
        section = EvalSection(output_dir=output, models=parsed_models, tasks=parsed_tasks)
    except ValidationError as err:
        raise RecipeError(f"eval options: {err.errors()[0]['msg']}") from None
    return resolve_eval_paths(section, Path.cwd(), "command line")


TargetArg = Annotated[
    str, typer.Argument(help="A trained run folder, a model folder, a .gguf file, a hub id or builtin:NAME.")
]
AdapterOpt = Annotated[
    list[str] | None, typer.Option("--adapter", help="Serve another adapter as NAME=FOLDER (repeatable).")
]


def _parse_adapters(items: list[str] | None) -> dict[str, str]:
    adapters = {}
    for item in items or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise typer.BadParameter(f"--adapter {item!r}: expected NAME=FOLDER")
        adapters[name] = folder
    return adapters


def _load(target: str, adapters: list[str] | None = None):
    _setup_logging()
    from llmtune.inference.loading import load_for_inference

    return load_for_inference(target, _parse_adapters(adapters))


def _pick(loaded, name: str | None) -> str:
    """The peft adapter to use: the named one, else the trained run's, else the base."""
    if name is None:
        return next(iter(loaded.adapters), None) or loaded.adapter_for(loaded.base_name)
    try:
        return loaded.adapter_for(name)
    except KeyError:
        raise typer.BadParameter(f"--model {name!r}: choose one of {', '.join(loaded.names)}") from None


@app.command()
def generate(
    target: TargetArg,
    input: Annotated[Path, typer.Option("--input", "-i", help="jsonl rows with `id` and `messages` or `prompt`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="jsonl of outputs; rows already there are skipped.")],
    model: Annotated[str | None, typer.Option(help="Which loaded model or adapter to use.")] = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> None:
    """Generate for every row of a jsonl file, in batches; resumable (ids already in --output are skipped)."""
    from llmtune.inference.batch import read_requests, run_generate
    from llmtune.inference.generation import Sampling

    loaded = _load(target)
    sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    items = read_requests(input, max_new_tokens, sampling, _pick(loaded, model))
    written = run_generate(loaded, items, output, batch_size)
    console.print(f"[green]done[/green] {written} new rows -> {output} ({len(items) - written} were already there)")


@app.command()
def chat(
    target: TargetArg,
    model: Annotated[str | None, typer.Option(help="Which loaded model or adapter to talk to.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
) -> None:
    """Chat in the terminal with a base model or a trained run (its own chat template); tokens stream."""
    from llmtune.inference.chat import chat_loop
    from llmtune.inference.generation import Sampling

    loaded = _load(target)
    chat_loop(loaded, _pick(loaded, model), system, Sampling(temperature, top_p), max_new_tokens, console=console)


@app.command()
def serve(
    target: TargetArg,
    adapter: AdapterOpt = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: Annotated[
        str | None, typer.Option(help="Name of an environment variable holding the API key clients must send.")
    ] = None,
    max_batch_size: int = 16,
    max_queue: int = 64,
) -> None:
    """OpenAI-compatible server: /v1/models, /v1/chat/completions (stream too), /v1/completions."""
    import uvicorn

    from llmtune.inference.server import create_app

    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise typer.BadParameter(f"--api-key-env {api_key_env}: that environment variable is empty")
    loaded = _load(target, adapter)
    app_ = create_app(loaded, api_key=key, max_batch_size=max_batch_size, max_queue=max_queue)
    err_console.print(f"serving {', '.join(loaded.names)} on http://{host}:{port}/v1", highlight=False)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def merge(
    runs: Annotated[list[Path], typer.Argument(help="A trained run folder (or several, with --combine).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write (default RUN-merged).")] = None,
    combine: Annotated[
        str | None,
        typer.Option(help="Combine the runs' adapters into one: linear, cat, ties, dare_linear, dare_ties, "
                          "magnitude_prune."),
    ] = None,
    weight: Annotated[list[float] | None, typer.Option("--weight", help="One per run, with --combine.")] = None,
    density: float = 0.5,
    atol: Annotated[float, typer.Option(help="Largest logit difference merged vs adapter model.")] = 1e-3,
) -> None:
    """Merge a run's adapter into a float copy of its base (verified), or combine adapters of one base."""
    _setup_logging()
    from llmtune.merge import combine_runs, merge_run

    if combine is None:
        if len(runs) != 1:
            raise typer.BadParameter("merge takes one run; use --combine METHOD for several")
        out = merge_run(runs[0], output or runs[0].with_name(f"{runs[0].name}-merged"), atol=atol)
    else:
        choices = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
        if combine not in choices:
            raise typer.BadParameter(f"--combine {combine!r}: choose one of {', '.join(choices)}")
        out = combine_runs(runs, output or runs[0].with_name(f"{runs[0].name}-combined"), combine, weight, density)
    console.print(f"[green]done[/green] {out}")


@app.command()
def publish(
    source: Annotated[Path, typer.Argument(help="A trained run folder (adapter) or a merged model folder.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: SOURCE-publish.")] = None,
    repo_id: Annotated[str | None, typer.Option(help="ORG/NAME on the Hub (needed with --push).")] = None,
    license: Annotated[str, typer.Option(help="License id for the card metadata.")] = "other",
    private: bool = False,
    push: Annotated[bool, typer.Option(help="Upload with huggingface_hub (token from HF_TOKEN).")] = False,
    eval_report: Annotated[
        Path | None, typer.Option(help="An `llmtune eval` report.json: its numbers go into the card (model-index).")
    ] = None,
    eval_model: Annotated[
        str | None, typer.Option(help="This model's name in the eval report (default: found by its path).")
    ] = None,
) -> None:
    """Build a publish folder (safetensors, model card, recipe, provenance); with --push, upload it."""
    from llmtune.publish import build_publish_folder, push_folder

    if push and not repo_id:
        raise typer.BadParameter("--push needs --repo-id ORG/NAME")
    folder = build_publish_folder(source, output or source.with_name(f"{source.name}-publish"), license, repo_id,
                                  eval_report, eval_model)
    console.print(f"[green]built[/green] {folder}")
    if push:
        console.print(f"[green]pushed[/green] {push_folder(folder, repo_id, private)}")


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
