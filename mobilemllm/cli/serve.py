"""`mobilemllm serve`: a bundle behind an OpenAI-compatible chat-completions API (see docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mobilemllm.cli.generate import PROVIDERS_HELP, split_providers


def serve(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="An exported bundle folder (ExecuTorch or ONNX)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. The default is loopback only; anything "
                                               "else exposes the server to your network."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on (0: any free port)."),
    model_name: Optional[str] = typer.Option(None, "--model-name",
                                             help="The model id clients send (default: the bundle folder's name)."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Allow image_url file paths (and file:// "
                                             "URLs) under this folder; without it only data URLs are accepted."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1,
                                   help="Answer length when a request gives no max_tokens."),
    max_queue: int = typer.Option(4, "--max-queue", min=0, help="Requests that may wait while one is answered; "
                                                                "more get 429."),
    queue_timeout: float = typer.Option(60.0, "--queue-timeout", min=0.1,
                                        help="Seconds a request may wait for its turn (then 503)."),
    request_timeout: float = typer.Option(300.0, "--request-timeout", min=0.1,
                                          help="Seconds an answer may run (then it stops, finish_reason length)."),
    idle_timeout: float = typer.Option(30.0, "--idle-timeout", min=0.1,
                                       help="Seconds a connection may stay silent (reading or being read)."),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", min=0.01, help="Largest request body, in MB."),
    providers: Optional[str] = typer.Option(None, help=PROVIDERS_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for the runner (default: the runtime's)."),
    verbose: bool = typer.Option(False, "--verbose/--quiet", help="Log every HTTP request."),
) -> None:
    """Serve a bundle with OpenAI's chat-completions API: POST /v1/chat/completions, GET /v1/models."""
    from mobilemllm.httpd import is_loopback, url_of  # lazy: cli startup
    from mobilemllm.serve import make_server  # lazy: cli startup

    server = make_server(bundle, host, port, model_name=model_name, max_tokens=max_tokens, max_queue=max_queue,
                         queue_timeout=queue_timeout, request_timeout=request_timeout, idle_timeout=idle_timeout,
                         max_body_mb=max_body_mb, image_dir=image_dir, verbose=verbose,
                         providers=split_providers(providers), threads=threads)
    url = url_of(server)
    if not is_loopback(host):
        typer.secho(f"warning: listening on {host}: anyone who can reach this machine can use the server",
                    fg="yellow", err=True)
    typer.echo(f"mobilemllm serve: model {server.RequestHandlerClass.state.model!r} at {url}v1 (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()
