"""lm-evaluation-harness on the demo model, as its users run it: its `hf` model and its
`local-completions` model against our server give the same scores and the same loglikelihoods
(bench.lm_eval_check, on the first examples of each task)."""

import pytest

from bench import lm_eval_check

DEMO_MODEL = str(lm_eval_check.REPO_ROOT / "bench" / "demo_models" / "pycode-8m")
EXAMPLES = 16  # of each task: 64 loglikelihoods and 16 generations


@pytest.mark.slow
def test_lm_eval_scores_the_server_as_it_scores_transformers(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install "
                                          "'lm-eval[api,hf]==0.4.13' (docs/lm-eval.md)")
    monkeypatch.chdir(lm_eval_check.WORKING_DIR)
    for name, value in lm_eval_check.OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    args = lm_eval_check.parse_args(["--model", DEMO_MODEL, "--limit", str(EXAMPLES),
                                     "--results-dir", str(tmp_path)])
    try:
        result = lm_eval_check.check(args)
    except lm_eval_check.ServerLacksLogprobs as error:
        pytest.skip(f"the server does not answer lm-eval's loglikelihood requests: {error}")
    assert result["passed"], result["failures"]
    next_line = result["comparison"]["pycode_next_line"]
    assert next_line["loglikelihoods"] == 4 * EXAMPLES
    assert next_line["max_abs_loglikelihood_diff"] <= lm_eval_check.TOLERANCE
    assert result["comparison"]["pycode_complete_line"]["examples"] == EXAMPLES
    assert len(list(tmp_path.glob("lm-eval-check-*.json"))) == 1
