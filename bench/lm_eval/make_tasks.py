"""Make the data of the lm-evaluation-harness tasks in bench/lm_eval/tasks/ from Python source
the demo models never trained on: the standard-library files that bench.demo.train holds out
(chosen by a hash of their path, so the same files on any Python version).

    python -m bench.lm_eval.make_tasks                  # rewrites bench/lm_eval/data/*.jsonl

Two tasks, both from real code:
- pycode_next_line (multiple choice, scored by loglikelihood): the lines before a line of a
  held-out file, and four candidates for the line that comes next: the true one and three lines
  of other held-out files, each put at the true line's indentation (so that indentation alone
  gives nothing away).
- pycode_complete_line (generate_until, exact match): the code before a point inside a line,
  cut where the demo tokenizer's tokens meet, and the rest of that line (a few tokens) to write.

The output depends only on the standard library it reads (the data records the Python version)
and on the tokenizer: the same inputs give the same files, byte for byte.
"""

import argparse
import json
import platform
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bench.demo.tokenizer import stdlib_sources
from bench.demo.train import _is_held_out
from bench.results import REPO_ROOT

DATA_DIR = REPO_ROOT / "bench" / "lm_eval" / "data"
DEMO_TOKENIZER = REPO_ROOT / "bench" / "demo_models" / "pycode-8m"

# Sized so that both runs of bench.lm_eval_check take a minute or two on a 2-core CPU.
NUM_NEXT_LINE = 100
NUM_COMPLETE_LINE = 100
CONTEXT_LINES = 12  # lines before the line in question, at most
MIN_CONTEXT_LINES = 4
NUM_CHOICES = 4
# A wrong choice is a line of about the true line's length (this share of it, either way), so
# that a plain sum of log-probabilities, which favours short lines, is a fair score.
LENGTH_RATIO = 1.3
# The rest of a line the model must write, in tokens: at least one, and few enough that an
# 8M-parameter model gets some of them right.
COMPLETION_TOKENS = (1, 4)
# Tables of numbers, not code: the codecs are lists of character mappings.
SKIPPED_FOLDERS = ("encodings/",)


@dataclass(frozen=True)
class SourceFile:
    name: str  # path under the standard library, e.g. json/decoder.py
    lines: list[str]  # each with its "\n"


def held_out_files(root: Path) -> list[SourceFile]:
    """The held-out .py files under root, in path order."""
    files = []
    for path in stdlib_sources(root):
        name = path.relative_to(root).as_posix()
        if not _is_held_out(name) or name.startswith(SKIPPED_FOLDERS):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        files.append(SourceFile(name, text.splitlines(keepends=True)))
    return files


def is_code_line(line: str) -> bool:
    """A line worth predicting: code (not blank, not only a comment) of a fair length, one line."""
    stripped = line.strip()
    return (10 <= len(stripped) <= 80 and not stripped.startswith("#") and line.endswith("\n")
            and "\t" not in line and stripped not in ('"""', "'''"))


def indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" "))]


def line_positions(files: list[SourceFile], rng: random.Random, count: int) -> list[tuple]:
    """`count` distinct (file, line index) pairs whose line is code with enough lines before it,
    spread over the files in proportion to their candidate lines."""
    candidates = [(file, index) for file in files for index, line in enumerate(file.lines)
                  if index >= MIN_CONTEXT_LINES and is_code_line(line)]
    return sorted(rng.sample(candidates, count), key=lambda pair: (pair[0].name, pair[1]))


def context_before(file: SourceFile, index: int) -> str:
    """Up to CONTEXT_LINES lines before line `index`, starting at a line boundary."""
    return "".join(file.lines[max(0, index - CONTEXT_LINES): index])


# --8<-- [start:next_line]
def next_line_examples(files: list[SourceFile], rng: random.Random) -> list[dict]:
    """The multiple-choice task: the true next line among lines of other files of about its
    length, at its indentation."""
    pool = sorted({(file.name, line.strip()) for file in files for line in file.lines
                   if is_code_line(line)})
    examples = []
    for file, index in line_positions(files, rng, NUM_NEXT_LINE):
        true_line = file.lines[index]
        context = context_before(file, index)
        length = len(true_line.strip())
        near = [(name, text) for name, text in pool
                if length / LENGTH_RATIO <= len(text) <= length * LENGTH_RATIO]
        others: list[str] = []
        while len(others) < NUM_CHOICES - 1:
            name, text = rng.choice(near)
            # From another file, not already a choice, and not a line of this context: a line
            # seen above would be a copy the model could simply point at.
            if name != file.name and text != true_line.strip() and text not in others \
                    and text not in context:
                others.append(text)
        choices = [true_line] + [indentation(true_line) + text + "\n" for text in others]
        rng.shuffle(choices)
        examples.append({"id": f"{file.name}:{index + 1}", "context": context,
                         "choices": choices, "label": choices.index(true_line)})
    return examples
# --8<-- [end:next_line]


# --8<-- [start:complete_line]
def complete_line_examples(files: list[SourceFile], rng: random.Random,
                           tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The generation task: code cut inside a line where two tokens meet, and the line's rest."""
    examples = []
    for file, index in line_positions(files, rng, NUM_COMPLETE_LINE * 2):
        before = context_before(file, index)
        line = file.lines[index].rstrip("\n")
        # The tokens of the context and the line together, with the character each ends at.
        encoding = tokenizer(before + line, add_special_tokens=False, return_offsets_mapping=True)
        ends = [end for _, end in encoding["offset_mapping"]]
        # Cut points: token ends inside the line's code (past its indentation, before its end).
        code_start = len(before) + len(indentation(line))
        cuts = [end for end in ends if code_start < end < len(before) + len(line)]
        cuts = [end for end in cuts if COMPLETION_TOKENS[0]
                <= sum(1 for e in ends if e > end) <= COMPLETION_TOKENS[1]]
        if not cuts:
            continue
        cut = rng.choice(cuts)
        prompt, target = (before + line)[:cut], (before + line)[cut:]
        # Both engines tokenize the prompt alone: keep only cuts where that gives the same
        # tokens as the whole text did, so the prompt ends where the model's tokens end.
        whole = encoding["input_ids"]
        alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if whole[: len(alone)] != alone:
            continue
        examples.append({"id": f"{file.name}:{index + 1}", "context": prompt, "target": target})
        if len(examples) == NUM_COMPLETE_LINE:
            break
    return examples
# --8<-- [end:complete_line]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lm_eval.make_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"],
                        help="the standard library to read (default: this Python's)")
    parser.add_argument("--tokenizer", default=str(DEMO_TOKENIZER),
                        help="where generate_until prompts may end (default: the demo model's)")
    parser.add_argument("--out-dir", default=str(DATA_DIR))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    files = held_out_files(Path(args.stdlib))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    out = Path(args.out_dir)
    next_line = next_line_examples(files, random.Random(args.seed))
    complete = complete_line_examples(files, random.Random(args.seed + 1), tokenizer)
    write_jsonl(out / "pycode_next_line.jsonl", next_line)
    write_jsonl(out / "pycode_complete_line.jsonl", complete)
    source = {"python": platform.python_version(), "held_out_files": [f.name for f in files],
              "seed": args.seed, "next_line": len(next_line), "complete_line": len(complete)}
    (out / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    print(f"{len(files)} held-out files of Python {source['python']}: {len(next_line)} "
          f"next-line and {len(complete)} complete-line examples in {out}")


if __name__ == "__main__":
    main()
