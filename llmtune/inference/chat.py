"""`llmtune chat`: talk to a base model or a trained run in the terminal, tokens streamed as they come."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

from llmtune.inference.generation import CallbackStreamer, GenerationRequest, Sampling, generate
from llmtune.inference.loading import Loaded

HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves."


def chat_loop(
    loaded: Loaded,
    adapter: str,
    system: str | None,
    sampling: Sampling,
    max_new_tokens: int,
    read: Callable[[str], str] = input,
    console: Console | None = None,
) -> list[dict[str, str]]:
    """Run until /exit or end of input; returns the final conversation."""
    console = console or Console()
    console.print(f"[bold]{' / '.join(loaded.names)}[/bold] — {HELP}", highlight=False)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            console.print("[dim](conversation cleared)[/dim]")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        console.print("assistant> ", end="")
        request = GenerationRequest(adapter=adapter, messages=list(history), max_new_tokens=max_new_tokens,
                                    sampling=sampling)
        reply = _stream_reply(loaded, request, console)
        console.print()
        history.append({"role": "assistant", "content": reply})
    return history


def _stream_reply(loaded: Loaded, request: GenerationRequest, console: Console) -> str:
    pieces: list[str] = []

    def emit(text: str) -> None:
        pieces.append(text)
        console.print(text, end="", markup=False, highlight=False)

    generate(loaded, [request], streamer=CallbackStreamer(loaded, emit))
    return "".join(pieces)
