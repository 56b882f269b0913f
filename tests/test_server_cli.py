"""The command line: every bad value ends the program with one line and exit status 2, before
anything loads, and --help shows each flag's default under the program's real name."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve.server import cli
from serve.server.cli import main

ROOT = Path(__file__).resolve().parent.parent


def exit_of(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of the CLI run in-process on `argv`."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    return exit.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-pages", "x"], "argument --num-pages: invalid int value: 'x'"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8' (choose from 'auto', "
                              "'float32', 'bfloat16', 'float16')"),
        (["--port", "70000"], "argument --port: must be in [1, 65535], got 70000"),
        (["--port", "http"], "argument --port: invalid int value: 'http'"),
        (["--seed", str(2**64)], f"--seed must be in [{-(2**63)}, {2**63 - 1}], got {2**64}"),
        (["--max-request-bytes", "0"], "argument --max-request-bytes: must be >= 1, got 0"),
        (["--shutdown-timeout", "-1"], "argument --shutdown-timeout: must be >= 0, got -1"),
        (["--shutdown-timeout", "nan"], "argument --shutdown-timeout: must be a finite number, "
                                        "got nan"),
        (["--batch-wait-ms", "inf"], "argument --batch-wait-ms: must be a finite number, got inf"),
        # ranges EngineConfig checks itself, reported under the flag's name
        (["--num-pages", "0"], "--num-pages must be >= 1, got 0"),
        (["--num-pages", "-1"], "--num-pages must be >= 1, got -1"),
        (["--max-model-len", "0"], "--max-model-len must be >= 1, got 0"),
        (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1, got 0"),
        (["--page-size", "0"], "--page-size must be >= 1, got 0"),
        (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1, got 0"),
        (["--max-batch-size", "0"], "--max-num-seqs must be >= 1, got 0"),  # its old name
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1], "
                                              "got 1.5"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, qwen3_dir, flags, message):
    status, stderr = exit_of(["--model", qwen3_dir, *flags], capsys)
    assert status == 2
    assert stderr == f"nanoserve: error: {message}\n"


def test_a_missing_model_flag_is_one_line_too(capsys):
    assert exit_of([], capsys) == (
        2, "nanoserve: error: the following arguments are required: --model\n"
    )


@pytest.mark.parametrize(
    "flags, env, source",
    [
        (["--api-key", ""], None, "--api-key"),
        (["--api-key", " "], "from-env", "--api-key"),  # the flag wins, even when blank
        ([], "", "$NANOSERVE_API_KEY"),
        ([], " \t", "$NANOSERVE_API_KEY"),
    ],
    ids=["empty-flag", "blank-flag-over-env", "empty-env", "blank-env"],
)
def test_an_empty_api_key_is_refused_before_anything_loads(capsys, monkeypatch, flags, env,
                                                           source):
    """An empty key would serve without authentication while the command line asks for it."""
    if env is None:
        monkeypatch.delenv("NANOSERVE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("NANOSERVE_API_KEY", env)
    monkeypatch.setattr(cli, "build_engine", lambda *_: pytest.fail("the engine was built"))
    assert exit_of(["--model", "unused", *flags], capsys) == (
        2, f"nanoserve: error: {source} is empty; to serve without authentication, leave both "
           "--api-key and $NANOSERVE_API_KEY unset\n"
    )


def test_a_model_the_engine_cannot_serve_is_one_line(capsys, qwen3_dir, tmp_path):
    """(In this process: the same errors reach the command line from a core process, as
    test_a_pool_that_cannot_be_is_one_line checks once; starting one costs seconds.)"""
    status, stderr = exit_of(["--model", str(tmp_path / "nowhere")], capsys)
    assert status == 2 and stderr.startswith("nanoserve: error: cannot find model")
    assert stderr.count("\n") == 1

    status, stderr = exit_of(["--model", qwen3_dir, "--max-model-len", "1000000",
                              "--no-core-process"], capsys)
    assert status == 2
    assert stderr.startswith("nanoserve: error: --max-model-len 1000000 exceeds the model's")

    config = json.loads(Path(qwen3_dir, "config.json").read_text())
    shutil.copytree(qwen3_dir, tmp_path / "gpt2")
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    status, stderr = exit_of(["--model", str(tmp_path / "gpt2"), "--device", "cpu",
                              "--no-core-process"], capsys)
    assert status == 2
    assert stderr.startswith("nanoserve: error: unsupported architecture ['GPT2LMHeadModel']")


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert help_text.startswith("usage: nanoserve ")
    for default in ["(default: 8000)", "(default: 127.0.0.1)", "(default: 4194304)",
                    "(default: 30.0)", "(default: 0.9)"]:
        assert default in help_text
    assert "(default: None)" not in help_text  # such a flag's help says what None means


def test_python_dash_m_serve_names_itself_and_prints_no_traceback():
    """The real entry point, in a subprocess (it imports torch: ~3 s)."""
    argv = [sys.executable, "-m", "serve", "--model", "m", "--num-pages", "-1"]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "python -m serve: error: --num-pages must be >= 1, got -1\n"


@pytest.mark.parametrize(
    "flags, start",
    [
        (["--num-pages", "100000000000"], "a KV pool of 100000000000 pages x 16 tokens needs "),
        (["--page-size", "100000000", "--no-core-process"],
         "a KV pool of 1 pages x 100000000 tokens needs "),
        (["--num-pages", "16", "--page-size", "4", "--max-model-len", "512",
          "--no-core-process"],
         "--max-model-len 512 needs 128 KV pages of 4 tokens and the pool has 16: raise "
         "--num-pages"),
    ],
)
def test_a_pool_that_cannot_be_is_one_line(capsys, qwen3_dir, flags, start):
    """A pool past the machine's memory, or too small for an asked-for context: one line, exit 2
    (they used to print a traceback, or start and refuse every default request). The first
    comes from a core process, as the server runs it; the others from this process."""
    status, stderr = exit_of(["--model", qwen3_dir, "--device", "cpu", *flags], capsys)
    assert status == 2 and stderr.startswith(f"nanoserve: error: {start}")
    assert stderr.count("\n") == 1
