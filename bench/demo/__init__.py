"""The demo models and the fixtures built like them: a tokenizer trained on the standard library
(`tokenizer`), a tiny model with random weights for tests and smoke runs
(`python -m bench.demo.random_model`, what tests/conftest.py builds), the training of the
committed demo models (`bench.demo.train`; the checkpoints and results are in bench/demo_models/),
their samples (`bench.demo.samples`) and loss curves (`bench.demo.plot_training`).
"""
