"""The same lm-evaluation-harness tasks on transformers and on nanoserve's server: the scores must
match, and so must every loglikelihood, within a tolerance.

    python -m bench.lm_eval_check --model bench/demo_models/pycode-8m
    python -m bench.lm_eval_check --model bench/demo_models/pycode-8m --limit 20   # a quick one

lm-eval runs twice, as its users run it: its `hf` model (transformers on this machine), then its
`local-completions` model against `python -m serve` started here, each with log_samples so that
every example's answers can be compared. The tasks are bench/lm_eval/tasks/ (made from local
files by bench.lm_eval.make_tasks): a multiple-choice task scored by loglikelihood, which the
server answers with `echo` and `logprobs`, and a greedy `generate_until` task. The check passes
when both runs give the same scores, every choice's loglikelihood differs by at most
--tolerance, and every generated text is the same. One result file per run, named after the
commit and the time, goes to --results-dir; the exit status is 1 when the check fails, 2 when
the server refuses lm-eval's loglikelihood requests (echo with logprobs).
docs/lm-eval.md shows the same runs as lm_eval command lines.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.course.compare import StageServer
from bench.results import REPO_ROOT, environment, result_name, write_result

TASKS_DIR = REPO_ROOT / "bench" / "lm_eval" / "tasks"
TASKS = ["pycode_next_line", "pycode_complete_line"]
RESULTS_DIR = REPO_ROOT / "bench" / "lm_eval" / "results"
# float32 on a CPU: transformers and the engine add up the same numbers in different orders
# (attention kernels, batch shapes), which moves a sum of log-probabilities by about 1e-5.
TOLERANCE = 1e-3


class ServerLacksLogprobs(RuntimeError):
    """The server refuses the body lm-eval sends for a loglikelihood (echo and logprobs)."""


# --8<-- [start:model_args]
def hf_model_args(model: Path, dtype: str) -> dict:
    return {"pretrained": repo_relative(model), "dtype": dtype}


def server_model_args(model: Path, served_name: str, base_url: str, max_length: int,
                      num_concurrent: int) -> dict:
    """local-completions against our server: the prompt goes as token ids, made by the model's
    own tokenizer from its directory (lm-eval needs it to find where the continuation starts)."""
    return {
        "model": served_name,  # what the request's "model" field says
        "base_url": f"{base_url}/v1/completions",
        "tokenizer": repo_relative(model),
        "tokenizer_backend": "huggingface",  # not "auto": it would probe /tokenizer_info first
        "max_length": max_length,  # the default, 2048, is more than the demo model holds
        "num_concurrent": num_concurrent,  # requests in flight at once (the server batches them)
    }
# --8<-- [end:model_args]


def repo_relative(path: Path) -> str:
    """A path as lm_eval's command line, run from the repository root, would name it (and as
    the result file records it: no machine's own folders)."""
    return str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def loglikelihood_body(served_name: str) -> dict:
    """What local-completions sends for one loglikelihood request (lm_eval 0.4.13's
    LocalCompletionsAPI._create_payload): the context and continuation as one prompt of token
    ids, one token to generate, and the prompt's own log-probabilities echoed back."""
    return {"model": served_name, "prompt": [[10, 11, 12, 13]], "temperature": 0,
            "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}


def check_loglikelihood_support(base_url: str, served_name: str) -> None:
    """Raise ServerLacksLogprobs, with the server's own words, if it refuses that body."""
    request = urllib.request.Request(
        f"{base_url}/v1/completions", data=json.dumps(loglikelihood_body(served_name)).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            choice = json.load(response)["choices"][0]
    except urllib.error.HTTPError as error:
        raise ServerLacksLogprobs(f"the server refuses echo with logprobs "
                                  f"({error.code}: {error.read().decode()[:300]})") from None
    token_logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    if len(token_logprobs) != 5:  # the 4 prompt tokens and the generated one
        raise ServerLacksLogprobs(f"the server answers echo with logprobs, but with "
                                  f"{len(token_logprobs)} token_logprobs for 4 prompt tokens "
                                  f"and 1 generated: {json.dumps(choice)[:300]}")


# --8<-- [start:evaluate]
def evaluate(model: str, model_args: dict, args: argparse.Namespace, **options) -> dict:
    """One lm-eval run over the tasks: its scores, each example's answers, the seconds taken."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=args.tasks, limit=args.limit,
        task_manager=TaskManager(include_path=str(TASKS_DIR)), log_samples=True, **options)
    seconds = time.perf_counter() - started
    return {
        "model": model,
        "model_args": model_args,
        "seconds": round(seconds, 1),
        "scores": {task: _scores(results["results"][task]) for task in args.tasks},
        "answers": {task: {sample["doc_id"]: _answers(sample)
                           for sample in results["samples"][task]} for task in args.tasks},
    }
# --8<-- [end:evaluate]


def _scores(task_results: dict) -> dict:
    """{"acc": 0.5, ...} from lm-eval's {"acc,none": 0.5, "acc_stderr,none": ...}."""
    return {key.split(",")[0]: value for key, value in task_results.items()
            if "," in key and "_stderr" not in key}


def _answers(sample: dict) -> list:
    """An example's answers, one per request: [loglikelihood, is_greedy] for each choice of a
    multiple-choice example, the generated text for a generate_until one."""
    return [list(answer) if isinstance(answer, tuple) else answer
            for answer in sample["filtered_resps"]]


def run_hf(args: argparse.Namespace) -> dict:
    print(f"lm-eval: hf on {args.model} ({args.device}, {args.dtype})", flush=True)
    return evaluate("hf", hf_model_args(args.model, args.dtype), args,
                    device=args.device, batch_size=args.hf_batch_size)


def run_server(args: argparse.Namespace, log: Path) -> dict:
    """Start the server, check that it answers lm-eval's loglikelihood body, run lm-eval on it."""
    flags = ["--model", str(args.model), "--served-model-name", args.served_model_name,
             "--device", args.device, "--dtype", args.dtype, *args.server_arg]
    with StageServer(REPO_ROOT, dict(os.environ), flags, log) as server:
        check_loglikelihood_support(server.base_url, args.served_model_name)
        print(f"lm-eval: local-completions on {server.base_url}", flush=True)
        model_args = server_model_args(args.model, args.served_model_name, server.base_url,
                                       max_model_len(args.model), args.num_concurrent)
        return evaluate("local-completions", model_args, args)


def max_model_len(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["max_position_embeddings"]


# --8<-- [start:compare]
def compare_task(task: str, hf: dict, server: dict, tolerance: float) -> dict:
    """One task's scores and answers from both runs, side by side, and what differs."""
    hf_scores, server_scores = hf["scores"][task], server["scores"][task]
    diffs, greedy_differs, texts_differ = [], 0, []
    for doc_id, hf_answers in sorted(hf["answers"][task].items()):
        server_answers = server["answers"][task][doc_id]
        for choice, (ours, theirs) in enumerate(zip(hf_answers, server_answers, strict=True)):
            if isinstance(ours, list):  # [loglikelihood, is_greedy]
                diffs.append({"diff": abs(ours[0] - theirs[0]), "doc_id": doc_id,
                              "choice": choice, "hf": ours[0], "server": theirs[0]})
                greedy_differs += ours[1] != theirs[1]
            elif ours != theirs:
                texts_differ.append({"doc_id": doc_id, "hf": ours, "server": theirs})
    diffs.sort(key=lambda entry: -entry["diff"])
    max_diff = diffs[0]["diff"] if diffs else None
    failures = [f"{metric}: hf {value} != server {server_scores.get(metric)}"
                for metric, value in hf_scores.items()
                if not math.isclose(value, server_scores.get(metric, math.nan), abs_tol=1e-12)]
    if max_diff is not None and not max_diff <= tolerance:
        failures.append(f"a loglikelihood differs by {max_diff:.2e} > {tolerance:g} "
                        f"(doc {diffs[0]['doc_id']}, choice {diffs[0]['choice']})")
    if texts_differ:
        failures.append(f"{len(texts_differ)} generated texts differ "
                        f"(docs {[entry['doc_id'] for entry in texts_differ[:10]]})")
    return {
        "scores": {"hf": hf_scores, "server": server_scores},
        "examples": len(hf["answers"][task]),
        "loglikelihoods": len(diffs),
        "max_abs_loglikelihood_diff": max_diff,
        "largest_diffs": diffs[:5],
        "is_greedy_differs": greedy_differs,  # near ties may flip it; it scores nothing here
        "texts_differ": texts_differ,
        "failures": failures,
    }
# --8<-- [end:compare]


def print_summary(tasks: dict, legs: dict) -> None:
    print(f"\n{'task':<22} {'metric':<12} {'hf':>8} {'server':>8}   answers")
    for task, entry in tasks.items():
        for metric, value in entry["scores"]["hf"].items():
            theirs = entry["scores"]["server"].get(metric, math.nan)
            diff = entry["max_abs_loglikelihood_diff"]
            note = (f"{diff:.1e} over {entry['loglikelihoods']} choices" if diff is not None
                    else f"{len(entry['texts_differ'])} texts differ")
            print(f"{task:<22} {metric:<12} {value:8.4f} {theirs:8.4f}   {note}")
    print(f"hf {legs['hf']['seconds']} s, server {legs['local-completions']['seconds']} s "
          "(lm-eval's own time: the server's start is not counted)")


def check(args: argparse.Namespace) -> dict:
    """Both runs, compared; the result (also written to a new file in args.results_dir)."""
    env = environment(args.device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = result_name("lm-eval-check", env, args.model.name, stamp)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    server = run_server(args, results_dir / name.replace(".json", ".server.log"))
    hf = run_hf(args)
    tasks = {task: compare_task(task, hf, server, args.tolerance) for task in args.tasks}
    failures = [f"{task}: {failure}" for task, entry in tasks.items()
                for failure in entry["failures"]]
    legs = {leg["model"]: {key: leg[key] for key in ("model_args", "seconds", "scores")}
            for leg in (hf, server)}
    import lm_eval

    result = {"kind": "lm-eval-check", "env": env, "lm_eval": lm_eval.__version__,
              "model": repo_relative(args.model),
              "tasks": args.tasks, "limit": args.limit, "tolerance": args.tolerance,
              "passed": not failures, "failures": failures, "legs": legs,
              "comparison": tasks}
    write_result(results_dir / name, result)
    print_summary(tasks, legs)
    print(("PASSED" if not failures else "FAILED:\n  " + "\n  ".join(failures))
          + f"\nwrote {results_dir / name}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lm_eval_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--served-model-name",
                        help="the name the server answers to (default: the directory's name)")
    parser.add_argument("--tasks", nargs="+", default=TASKS, help=f"in {TASKS_DIR}")
    parser.add_argument("--limit", type=int, help="only the first N examples of each task")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="the largest difference allowed between two loglikelihoods")
    parser.add_argument("--hf-batch-size", type=int, default=8)
    parser.add_argument("--num-concurrent", type=int, default=8,
                        help="requests lm-eval keeps in flight to the server")
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                        help="one more flag for `python -m serve` (repeat it), e.g. "
                             "--server-arg=--no-enable-prefix-caching")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    args.model = Path(args.model).resolve()
    args.served_model_name = args.served_model_name or args.model.name
    args.results_dir = str(Path(args.results_dir).resolve())
    return args


# The tasks name their data relative to the repository root, as lm_eval's command line needs
# them named; and nothing may reach for the Hugging Face hub (the data and models are local).
WORKING_DIR = REPO_ROOT
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.chdir(WORKING_DIR)
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    try:
        result = check(args)
    except ServerLacksLogprobs as error:
        print(f"python -m bench.lm_eval_check: {error}", file=sys.stderr)
        sys.exit(2)
    if not result["passed"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
