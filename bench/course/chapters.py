"""Numbers in the chapters come from committed result files, and this keeps them that way.

    python -m bench.course.chapters           # check every chapter (tests/test_chapters.py runs it)
    python -m bench.course.chapters --write   # regenerate the generated tables in place

A chapter states three kinds of thing about its measurements (see docs/writing-chapters.md):

- a declaration, once per result file it uses:  <!-- result v01: milestones/01/x.json -->
  (a file from before results recorded their command may add it: `... x.json | python -m ...`);
- a number in the prose, followed by the expression it equals:
      447.3<!-- = v01.metrics.output_tokens_per_s -->
  The check computes the expression from the files and fails unless it rounds to the number as
  written (to as many decimals as are shown). A division between files of two different runs
  fails too: a ratio is only taken within one run (a file's run is the manifest
  milestones/runs/<run id>/run.json that lists it; any other file is a run of its own).
  Besides sum, len, min, max and abs, an expression may read a profiled step's CPU ops:
  sum(cpu_op_us(t1, "aten::linear")) / 1000 is the milliseconds that op took in timeline
  file t1, and gpu_kernel_us(t1, "void flashinfer::") the durations of the GPU kernels whose
  names start so;
- a generated block:  <!-- begin throughput v00 v01 --> ... <!-- end throughput -->
  whose content is rendered from the files (tables, provenance boxes); --write fills it in, the
  check fails when it differs from what the files give.
"""

import argparse
import ast
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.course.run_files import RUNS_DIR, listed_files, resolve
from bench.results import REPO_ROOT, env_of, read_result

DECLARATION = re.compile(r"<!-- result (?P<name>\w+): (?P<path>[^|>]+?)"
                         r"(?: \| (?P<command>.+?))? -->")
NUMBER = re.compile(r"(?P<number>-?\d[\d,]*(?:\.\d+)?)(?P<unit>[^\d<\n]{0,16}?)"
                    r"<!-- = (?P<expr>.+?) -->")
BLOCK = re.compile(r"<!-- begin (?P<kind>[\w-]+)(?P<args>[^>]*?) -->\n(?P<body>.*?)"
                   r"<!-- end (?P=kind) -->", re.S)
LOOSE_MARKER = re.compile(r"<!-- = ")


def chapter_files() -> list[Path]:
    """Every page that may state numbers: the chapters and the site's own pages."""
    return sorted((REPO_ROOT / "milestones").glob("[0-9][0-9]/README.md")) + sorted(
        (REPO_ROOT / "docs").glob("*.md"))


@dataclass
class Result:
    """One declared result file."""

    name: str
    path: Path
    data: dict
    command: str | None = None
    run_json: Path | None = None  # the manifest of the run the file belongs to

    @property
    def run(self) -> str:
        """The files of one run (bench.course.stages, bench.course.compare) are one run wherever
        they sit; any other file is a run of its own."""
        return str(self.run_json or self.path)

    def manifest(self) -> dict | None:
        return read_result(self.run_json) if self.run_json and self.run_json != self.path \
            else None


def run_index() -> dict[Path, Path]:
    """{file: the run.json that lists it} for every run under milestones/runs/."""
    index = {}
    for run_json in sorted(RUNS_DIR.glob("*/run.json")):
        for listed in listed_files(read_result(run_json)):
            index[resolve(run_json.parent, listed)] = run_json
    return index


def run_json_of(path: Path, data, index: dict[Path, Path]) -> Path | None:
    """The manifest of the run a result belongs to: the one its run_id names, which must list
    it; a file without a run_id (a timeline, a file from before results carried one) is found
    by the manifest that lists it; a file in no run has none."""
    run_id = data.get("run_id") if isinstance(data, dict) else None
    if not run_id:
        return index.get(path)
    run_json = RUNS_DIR / run_id / "run.json"
    if path != run_json and index.get(path) != run_json:
        raise ValueError(f"{shown(path)} is a file of run {run_id}, but "
                         f"{shown(run_json)} does not list it")
    return run_json


class Value:
    """A JSON value in an expression: `.key` and `["key"]` read dicts, `[0]` lists."""

    def __init__(self, data, result: Result) -> None:
        self.data, self.result = data, result

    def get(self, key):
        try:
            return wrap(self.data[key], self.result)
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{self.result.name}: no {key!r} in {self.result.path.name}") from None


def wrap(data, result: Result):
    return Value(data, result) if isinstance(data, (dict, list)) else data


def cpu_op_us(timeline: dict, name: str) -> list[float]:
    """The durations (us) of the top-level CPU ops called `name` in one profiled step, read from
    a bench/probe.py timeline file: sum() of them is the CPU time the step spent in that op,
    len() how many calls it made, max() its longest call."""
    if not isinstance(timeline, dict) or not {"names", "cpu"} <= timeline.keys():
        raise ValueError("cpu_op_us reads a timeline file (bench/probe.py's names and cpu)")
    if name not in timeline["names"]:  # a misspelt op fails rather than counting zero
        raise ValueError(f"no CPU op {name!r} in this timeline")
    index = timeline["names"].index(name)
    return [duration for op, _, duration in timeline["cpu"] if op == index]


def gpu_kernel_us(timeline: dict, prefix: str) -> list[float]:
    """The durations (us) of the GPU kernels (and copies) whose name starts with `prefix` in a
    profiled timeline file: sum() of them is the GPU time they took, len() how many ran."""
    if not isinstance(timeline, dict) or not {"names", "gpu"} <= timeline.keys():
        raise ValueError("gpu_kernel_us reads a timeline file (names and gpu)")
    chosen = {i for i, name in enumerate(timeline["names"]) if name.startswith(prefix)}
    if not chosen:  # a misspelt kernel fails rather than counting zero
        raise ValueError(f"no GPU kernel named {prefix!r}... in this timeline")
    return [duration for kernel, _, duration in timeline["gpu"] if kernel in chosen]


FUNCTIONS: dict[str, Callable] = {"sum": sum, "len": len, "min": min, "max": max, "abs": abs,
                                  "cpu_op_us": cpu_op_us, "gpu_kernel_us": gpu_kernel_us}


def evaluate(expression: str, results: dict[str, Result]) -> tuple[float, set[str]]:
    """The expression's value and the runs it read. Only names, keys, indexes, numbers, quoted
    strings, + - * / and a few functions are allowed: a chapter is not a place for code."""
    tree = ast.parse(expression, mode="eval")
    runs: set[str] = set()
    divides = False

    def visit(node):
        nonlocal divides
        if isinstance(node, ast.Expression):
            return visit(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in results:
                raise ValueError(f"{node.id!r} is not a declared result")
            runs.add(results[node.id].run)
            return Value(results[node.id].data, results[node.id])
        if isinstance(node, ast.Attribute):
            return visit(node.value).get(node.attr)
        if isinstance(node, ast.Subscript):
            return visit(node.value).get(visit(node.slice))
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult,
                                                                ast.Div)):
            divides = divides or isinstance(node.op, ast.Div)
            left, right = visit(node.left), visit(node.right)
            return {ast.Add: lambda: left + right, ast.Sub: lambda: left - right,
                    ast.Mult: lambda: left * right, ast.Div: lambda: left / right}[
                        type(node.op)]()
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -visit(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in FUNCTIONS and not node.keywords:
            args = [visit(arg) for arg in node.args]
            value = FUNCTIONS[node.func.id](
                *[arg.data if isinstance(arg, Value) else arg for arg in args])
            source = next((arg.result for arg in args if isinstance(arg, Value)), None)
            return wrap(value, source) if source else value  # a list stays indexable
        raise ValueError(f"not allowed in a number's expression: {ast.unparse(node)!r}")

    value = visit(tree)
    if isinstance(value, Value) or not isinstance(value, (int, float)):
        raise ValueError(f"{expression!r} is not a number")
    if divides and len(runs) > 1:
        raise ValueError(f"{expression!r} divides numbers of different runs {sorted(runs)}: "
                         "take ratios within one run")
    return value, runs


def matches(shown: str, value: float) -> bool:
    """Does `value` round to the number as written (2,216 / 0.8 / 14.9)?"""
    text = shown.replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-9) + 1e-12


# --- generated blocks -------------------------------------------------------------------------


def fmt(value: float | None, decimals: int = 1, unit: str = "") -> str:
    return "—" if value is None else f"{value:,.{decimals}f}{unit}"


NOT_RECORDED = "not recorded"


def label(result: Result) -> str:
    """A column's name: the stage's tag, else the code's commit."""
    tag = env_of(result.data).get("git_tag")
    commit = code_commit(result.data)
    return tag.split("-")[0] if tag else (f"`{commit[:8]}`" if commit else "code " + NOT_RECORDED)


def code_commit(data: dict) -> str | None:
    """The commit of the code a result measured: a serving result's server (bench.course.compare
    records it as server_commit; the env is the harness that sent the requests), else the
    commit of the checkout that wrote the file."""
    return data.get("server_commit") or env_of(data).get("git_commit")


def one_run(results: list[Result]) -> None:
    runs = {r.run for r in results}
    baselines = {repr(r.data.get("hf_baseline")) for r in results}
    if len(runs) > 1 and len(baselines) > 1:
        raise ValueError(f"{[r.name for r in results]} come from different runs: a table of "
                         "ratios takes one run")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; with no rows, a line that says so rather than a header alone."""
    if not rows:
        return ["*(The files hold no rows for this table.)*"]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def render_throughput(results: list[Result]) -> list[str]:
    """Output tok/s, requests/s and wall time of stages in one run, with the run's HF baseline."""
    one_run(results)
    hf = results[0].data.get("hf_baseline")
    columns = [(label(r), r.data["metrics"]) for r in results]
    if hf:
        batch = f" (batch {hf['batch_size']})" if hf.get("batch_size") else ""
        columns.append((f"HF `generate`{batch}", hf))
    header = [""] + [name for name, _ in columns]
    rows = [["output tokens/s"] + [fmt(m["output_tokens_per_s"]) for _, m in columns],
            ["requests/s"] + [fmt(m["requests_per_s"], 2) for _, m in columns],
            ["wall time"] + [fmt(m["wall_time_s"], 1, " s") for _, m in columns]]
    if hf:
        rows.append(["vs HF `generate`"] + [
            fmt(m["output_tokens_per_s"] / hf["output_tokens_per_s"], 2, "×")
            for _, m in columns])
    return table(header, rows)


def render_step_profile(results: list[Result]) -> list[str]:
    """A bench.step_profile file: each batch size's decode step against its roofline."""
    (result,) = results
    data = result.data
    rows = [[str(row["batch_size"]), fmt(row["decode_step_ms"], 1, " ms"),
             fmt(row["decode_tokens_per_s"], 0), fmt(row["roofline_step_ms"], 2, " ms"),
             fmt(100 * row["roofline_fraction"], 1, " %") if row["roofline_fraction"] else "—"]
            for row in data["rows"]]
    return table(["batch", "decode step", "decode tokens/s", "roofline step", "of roofline"],
                 rows)


def render_serving(results: list[Result]) -> list[str]:
    """bench.serving files: latency percentiles and throughput at each request rate."""
    rows = []
    for result in results:
        m = result.data["metrics"]
        rate = result.data["request_rate"]
        rows.append([f"{rate:g} req/s" if rate != "inf" else "all at once", str(m["completed"]),
                     fmt((m["ttft_ms"]["p50"] or 0) / 1e3, 1, " s"),
                     fmt((m["ttft_ms"]["p90"] or 0) / 1e3, 1, " s"),
                     fmt(m["tpot_ms"]["p50"], 0, " ms"), fmt(m["output_tokens_per_s"], 1)])
    return table(["request rate", "requests", "p50 TTFT", "p90 TTFT", "p50 TPOT",
                  "output tok/s"], rows)


def render_max_batch(results: list[Result]) -> list[str]:
    rows = []
    for result in results:
        d = result.data
        w = d["workload"]
        rows.append([f"{w['name']} ({w['input_len'][0]}–{w['input_len'][1]} in, "
                     f"{w['output_len'][0]}–{w['output_len'][1]} out)", f"{d['kv_gib']:g} GiB",
                     str(d["contiguous_max_batch"]), f"**{d['paged_max_batch']}**",
                     fmt(d["ratio"], 2, "×")])
    return table(["workload lengths", "KV memory", "v0.1 (contiguous)", "v0.2 (paged)",
                  "ratio"], rows)


def render_mixed_step(results: list[Result]) -> list[str]:
    """A bench.mixed_step file: per budget, the chunk alone, and for each number B of decoding
    requests their decode step, the step with a chunk split (decode rows from their graph) and
    all eager, and how many times faster the split step is (eager ÷ split)."""
    (result,) = results
    rows = result.data["rows"]
    budgets = list(dict.fromkeys(row["budget"] for row in rows))
    batches = [b for b in dict.fromkeys(row["batch_size"] for row in rows) if b]
    at = {(row["budget"], row["batch_size"]): row for row in rows}
    header = ["budget"] + (["chunk alone"] if any(b == 0 for _, b in at) else [])
    for batch in batches:
        header += [f"*B* = {batch}: decode", "split", "all eager", "eager ÷ split"]
    lines = []
    for budget in budgets:
        cells = [f"{budget:,}"]
        if "chunk alone" in header:
            alone = at.get((budget, 0))
            cells.append(fmt(alone["eager"]["mixed_step_ms"] if alone else None))
        for batch in batches:
            row = at.get((budget, batch))
            cells += [fmt(row["split"]["decode_step_ms"]), fmt(row["split"]["mixed_step_ms"]),
                      fmt(row["eager"]["mixed_step_ms"]), fmt(row["split_vs_eager"], 2, "×")] \
                if row else ["—"] * 4
        lines.append(cells)
    return table(header, lines)


def on_gpu(result: Result) -> bool:
    return str(result.data.get("device", "")).startswith("cuda")


def render_probe_work(results: list[Result]) -> list[str]:
    """What each stage computed for the workload (bench/probe.py), by stage."""
    rows = []
    for result in results:
        s, d = result.data["summary"], result.data["decode_step"]
        p, dec = s["prefill"], s["decode"]
        rows.append([label(result), str(result.data["num_requests"]),
                     f"{p['tokens_computed']:,} ({p['padding_tokens']:,})", f"{dec['steps']:,}",
                     f"{dec['rows_computed']:,} ({dec['idle_rows']:,})", fmt(dec["mean_rows"]),
                     f"{d['kernels']:,}" if on_gpu(result) else "—"])
    return table(["stage", "requests", "prefill tokens computed (padding)", "decode steps",
                  "decode rows computed (finished rows)", "rows per decode step",
                  "kernels per decode step"], rows)


def render_probe_time(results: list[Result]) -> list[str]:
    """Where a decode step's time goes, by stage (median step; phases averaged over steps)."""
    rows = []
    for result in results:
        for name, probe in [(label(result), result.data), *(
                (f"{label(result)}, {variant}", data)
                for variant, data in result.data.get("variants", {}).items())]:
            dec, d = probe["summary"]["decode"], probe["decode_step"]
            per_step = {k: v / dec["steps"] for k, v in dec["phase_ms"].items()} \
                if dec["steps"] else {}
            rest = (dec["time_ms"] / dec["steps"] - sum(per_step.values())) if dec["steps"] \
                else None
            rows.append([name, fmt(dec["median_step_ms"], 1, " ms"),
                         fmt(per_step.get("forward"), 1, " ms"),
                         fmt(per_step.get("sample"), 1, " ms"),
                         fmt(per_step.get("output"), 1, " ms"), fmt(rest, 1, " ms"),
                         f"{d['kernels']:,}", fmt(d["gpu_busy_ms"], 1, " ms")])
    return table(["stage", "decode step (median)", "forward", "sample", "output",
                  "rest (waiting for the GPU)", "kernels", "GPU busy"], rows)


def when(data: dict) -> str:
    stamp = env_of(data).get("timestamp") or data.get("started")
    return f"{stamp[:16].replace('T', ' ')} UTC" if stamp else "time " + NOT_RECORDED


def page_depth(page: Path) -> int:
    """Folders between the page and the site's root. The site puts milestones/NN/README.md at
    milestones/NN/ (docs/hooks/milestones.py), as on GitHub; docs/x.md is at the site's root."""
    docs = REPO_ROOT / "docs"
    if page.is_relative_to(docs):
        return len(page.relative_to(docs).parts) - 1
    return len(page.relative_to(REPO_ROOT).parts) - 1 if page.is_relative_to(REPO_ROOT) else 0


def render_provenance(results: list[Result], page: Path) -> list[str]:
    """A small box: which file, which code, which machine, when, which command. A file that
    records none of that (a profiler timeline) is described by the result written with it."""
    lines = ['??? info "Where these numbers come from"']
    for result in results:
        line = f"    - {file_link(result.path, page)}: "
        source = result
        if not env_of(result.data):
            source = written_with(result) or result
            if source is not result:
                line += f"written with {file_link(source.path, page)}, "
        lines.append(line + provenance_of(source))
    return lines


def file_link(path: Path, page: Path) -> str:
    return f"[`{path.name}`]({Path(*['..'] * page_depth(page), shown(path)).as_posix()})"


def provenance_of(result: Result) -> str:
    """Code, machine, time, run and command of one result; "not recorded" where it lacks one."""
    data, env, manifest = result.data, env_of(result.data), result.manifest()
    command = (result.command or env.get("command") or (manifest or {}).get("command")
               or NOT_RECORDED)
    commit = code_commit(data)
    tag = data.get("tag") if data.get("server_commit") else env.get("git_tag")
    code = (f"code `{commit[:8]}`" if commit else "code " + NOT_RECORDED) + \
        (f" ({tag})" if tag else "")
    harness = env.get("git_commit")
    if data.get("server_commit") and harness and harness != data["server_commit"]:
        code = f"server {code}, requests sent by harness `{harness[:8]}`"
    device = env.get("device_name") or "device " + NOT_RECORDED
    run = f", run `{manifest['run_id']}`" if manifest else ""
    return f"{code}, {device}, {when(data)}{run}, " + \
        (f"`{command}`" if command != NOT_RECORDED else "command " + NOT_RECORDED)


RUN_START = re.compile(r"\d{8}-\d{6}$")


def written_with(result: Result) -> Result | None:
    """The result a file without its own record (a profiler timeline) was written with: the
    probe its run's manifest lists beside it, else the file of the same folder, commit and run
    start whose name it extends (timeline-mixed-step-h200-1b4087ff-...-b64-budget2048-<start>
    is mixed-step-h200-1b4087ff-...-<start>'s)."""
    manifest = result.manifest()
    for stage in (manifest or {}).get("stages", []):
        if stage.get("timeline") and resolve(result.run_json.parent, stage["timeline"]) == \
                result.path:
            source = stage.get("probe") or stage.get("throughput")
            path = resolve(result.run_json.parent, source)
            return Result(result.name, path, read_result(path), None, result.run_json)
    stem = result.path.stem.removeprefix("timeline-")
    start = RUN_START.search(stem)
    if stem == result.path.stem or not start:
        return None
    best, best_shared = None, 3  # at least the kind, the device and the commit in common
    for path in sorted(result.path.parent.glob(f"*-{start.group()}.json")):
        if path.name.startswith("timeline-"):
            continue
        shared = 0
        for mine, theirs in zip(stem.split("-"), path.stem.split("-"), strict=False):
            if mine != theirs:
                break
            shared += 1
        if shared > best_shared:
            data = read_result(path)
            if isinstance(data, dict) and env_of(data):
                run_json = RUNS_DIR / data["run_id"] / "run.json" if data.get("run_id") \
                    else None
                best, best_shared = Result(result.name, path, data, None, run_json), shared
    return best


RENDERERS = {"throughput": render_throughput, "step-profile": render_step_profile,
             "serving": render_serving, "max-batch": render_max_batch,
             "mixed-step": render_mixed_step,
             "probe-work": render_probe_work, "probe-time": render_probe_time}


def render_block(kind: str, args: list[str], results: dict[str, Result], page: Path) -> str:
    if not args:
        raise ValueError(f"block {kind} names no result (<!-- begin {kind} NAME ... -->)")
    missing = [a for a in args if a not in results]
    if missing:
        raise ValueError(f"block {kind}: {missing} not declared (<!-- result NAME: path -->)")
    chosen = [results[a] for a in args]
    if kind == "provenance":
        lines = render_provenance(chosen, page)
    elif kind in RENDERERS:
        lines = RENDERERS[kind](chosen)
    else:
        raise ValueError(f"unknown block {kind!r}: one of provenance, {', '.join(RENDERERS)}")
    return "\n".join(lines) + "\n"


# --- checking a page --------------------------------------------------------------------------


@dataclass
class Report:
    page: Path
    errors: list[str] = field(default_factory=list)
    numbers: int = 0
    blocks: int = 0

    def error(self, text: str, line: int | None = None) -> None:
        where = shown(self.page) + (f":{line}" if line else "")
        self.errors.append(f"{where}: {text}")


def shown(path: Path) -> str:
    """A path as the repository names it (or as given, outside it)."""
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def load_results(text: str, report: Report) -> dict[str, Result]:
    results, index = {}, run_index()
    for match in DECLARATION.finditer(text):
        path = REPO_ROOT / match["path"].strip()
        if not path.exists():
            report.error(f"result {match['name']}: no file {match['path']}",
                         line_of(text, match.start()))
            continue
        data = read_result(path)
        try:
            run_json = run_json_of(path, data, index)
        except ValueError as exc:
            report.error(f"result {match['name']}: {exc}", line_of(text, match.start()))
            continue
        results[match["name"]] = Result(match["name"], path, data, match["command"], run_json)
    return results


FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def mask_code(text: str) -> str:
    """The text with fenced code blocks blanked out (same length, same lines): markers shown as
    examples inside code are not markers."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def process(page: Path, write: bool = False) -> Report:
    """Check one page (and with write, regenerate its blocks in place)."""
    report = Report(page)
    text = page.read_text()
    masked = mask_code(text)
    results = load_results(masked, report)
    pieces, last = [], 0
    for match in BLOCK.finditer(masked):
        report.blocks += 1
        line = line_of(text, match.start())
        try:
            body = render_block(match["kind"], match["args"].split(), results, page)
        except (ValueError, KeyError, TypeError) as exc:
            report.error(str(exc), line)
            continue
        if body != match["body"] and not write:
            report.error(f"block {match['kind']}{match['args']} differs from its files: run "
                         "`make chapters` (python -m bench.course.chapters --write)", line)
        pieces += [text[last:match.start()],
                   f"<!-- begin {match['kind']}{match['args']} -->\n{body}"
                   f"<!-- end {match['kind']} -->"]
        last = match.end()
    new_text = "".join(pieces) + text[last:]
    if write and new_text != text:
        page.write_text(new_text)
    masked = mask_code(new_text)
    checked = set()
    for match in NUMBER.finditer(masked):
        report.numbers += 1
        checked.add(match.start("expr"))
        line = line_of(masked, match.start())
        try:
            value, _ = evaluate(match["expr"], results)
        except (ValueError, SyntaxError, TypeError, ZeroDivisionError) as exc:
            report.error(f"{match['expr']!r}: {exc}", line)
            continue
        if not matches(match["number"], value):
            report.error(f"{match['number']} but {match['expr']} = {value:.6g}", line)
    for match in LOOSE_MARKER.finditer(masked):  # a marker with no number right before it
        if match.end() not in checked:
            report.error("a <!-- = ... --> marker must follow the number it checks",
                         line_of(masked, match.start()))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.course.chapters",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="default: every chapter and docs/*.md")
    parser.add_argument("--write", action="store_true", help="regenerate the generated blocks")
    args = parser.parse_args(argv)
    pages = [Path(p).resolve() for p in args.pages] or chapter_files()
    errors = 0
    for page in pages:
        report = process(page, write=args.write)
        for error in report.errors:
            print(error)
        errors += len(report.errors)
        print(f"{shown(page)}: {report.numbers} numbers, {report.blocks} "
              f"generated blocks" + (f", {len(report.errors)} errors" if report.errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
