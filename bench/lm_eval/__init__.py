"""lm-evaluation-harness tasks made from local files (`make_tasks`, `tasks/`, `data/`), which
bench.lm_eval_check runs on transformers and on nanoserve's server (docs/lm-eval.md)."""
