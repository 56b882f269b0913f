"""The benchmarks, one program per measurement (`python -m bench.throughput`, `bench.serving`,
`bench.step_profile`, ..., and `bench/probe.py`), and what they share: workloads, result files,
model configs, and `step_hook`, the one place that knows where a step enters the engine's
runner. Their CLIs and JSON stay the same from stage to stage: the course runs each stage's own
copy of them inside that stage's tree.

The course's tooling around them is in `bench.course`; the demo models' code in `bench.demo`.
"""
