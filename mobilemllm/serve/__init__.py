"""Serve a bundle over HTTP with OpenAI's chat-completions API (`mobilemllm serve`); see docs/serving.md."""

from mobilemllm.serve.server import DEFAULT_HOST, DEFAULT_PORT, make_server

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "make_server"]
