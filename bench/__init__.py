"""The benchmarks every stage runs, with the same CLIs: throughput, serving, HF baseline."""
