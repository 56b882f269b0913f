"""`python -m serve.cluster`: the engine's replicas on a Ray cluster."""

from serve.cluster.cli import main

main()
