"""`mobilemllm demo`: serve the local web demo for a bundle (upload an image, ask, watch it stream)."""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Optional

import typer

from mobilemllm.cli.generate import PROVIDERS_HELP, split_providers


def demo(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="An exported bundle folder (ExecuTorch: "
                                                           "--target android|portable, or ONNX)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. The default is loopback only; anything "
                                               "else exposes the demo to your network."),
    port: int = typer.Option(8765, min=0, max=65535, help="Port to listen on (0: any free port)."),
    max_upload_mb: float = typer.Option(8.0, "--max-upload-mb", min=0.01, help="Largest image file accepted, in MB."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Default answer length in tokens."),
    open_browser: bool = typer.Option(False, "--open/--no-open", help="Open the page in the default browser."),
    verbose: bool = typer.Option(False, "--verbose/--quiet", help="Log every HTTP request."),
    providers: Optional[str] = typer.Option(None, help=PROVIDERS_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for the runner (default: the runtime's)."),
) -> None:
    """Serve a local web page to chat with a bundle about an image, follow-ups included (Ctrl-C stops it)."""
    from mobilemllm.demo_server import is_loopback, make_server, url_of  # lazy: cli startup

    server = make_server(bundle, host, port, max_upload_mb=max_upload_mb, max_new_tokens=max_new_tokens,
                         verbose=verbose, providers=split_providers(providers), threads=threads)
    url = url_of(server)
    if not is_loopback(host):
        typer.secho(f"warning: listening on {host}: anyone who can reach this machine can use the demo",
                    fg="yellow", err=True)
    typer.echo(f"mobilemllm demo: {bundle} at {url} (Ctrl-C to stop)")
    if open_browser:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()
