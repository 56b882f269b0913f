"""`python -m serve`: the OpenAI-compatible server."""

from serve.server.cli import main

main(prog="python -m serve")
