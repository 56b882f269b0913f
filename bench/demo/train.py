"""Train the course's demo models: a small Qwen3-shaped model of Python code, and a draft model
for it (same tokenizer, several times fewer parameters), on the Python sources that ship with the
interpreter. Nothing is downloaded.

    python -m bench.demo.train --out-dir bench/demo_models --results-dir bench/demo_models
    python -m bench.demo.train --smoke --out-dir /tmp/demo     # a few steps on a CPU (the tests)

The models are transformers' own Qwen3ForCausalLM, trained with plain PyTorch: the engine must
give exactly what transformers gives on them, so the reference is the model that was trained,
and save_pretrained writes a checkpoint any Hugging Face tool loads. Files are split into a
training and a held-out set by a hash of their path (stable across machines and Python
versions); the tokenizer is trained on the training files only. Each model trains for a number
of passes over the training tokens, within a time budget, and the result file records the loss
curve, the held-out loss, perplexity and next-token accuracy, the tokens seen, the time, the GPU,
and how often the draft's greedy token equals the target's on text the target wrote (the share
of drafted tokens that speculative decoding accepts).
"""

import argparse
import hashlib
import json
import math
import platform
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from bench.demo.random_model import make_config
from bench.demo.tokenizer import END_OF_TEXT, stdlib_sources, train_tokenizer
from bench.results import (
    REPO_ROOT,
    env_of,
    environment,
    read_result,
    result_name,
    write_result,
)

HELD_OUT_PERCENT = 5  # of the files, chosen by a hash of their path
DEMO_MODELS = REPO_ROOT / "bench" / "demo_models"  # the committed checkpoints and their training


def demo_models() -> tuple[dict, Path, Path]:
    """The committed demo models: the result file of the training that made them (the newest
    in DEMO_MODELS), the target's checkpoint and the draft's."""
    result = max((read_result(path) for path in DEMO_MODELS.glob("train-demo-*.json")),
                 key=lambda result: env_of(result)["timestamp"])
    names = [result["models"][role]["name"] for role in ("target", "draft")]
    return result, DEMO_MODELS / names[0], DEMO_MODELS / names[1]


# --8<-- [start:sizes]
@dataclass(frozen=True)
class ModelSize:
    """A Qwen3 shape: head_dim 64 and two query heads per KV head, as FlashInfer and Qwen3-0.6B
    have them, and a tied embedding."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int = 64


# Both together stay under 20 MB in bf16: the checkpoints are committed, and each call of the GPU
# machine carries the repository within 64 MiB, beside FlashInfer's wheels (23 MB).
TARGET = ModelSize(hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=3, intermediate_size=1024)
DRAFT = ModelSize(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=3, intermediate_size=512)
SMOKE = ModelSize(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=128, head_dim=32)
# --8<-- [end:sizes]


@dataclass(frozen=True)
class Schedule:
    """How one model trains: AdamW, a linear warm-up, then a cosine decay to a tenth."""

    epochs: float  # passes over the training tokens
    seconds: float  # the most it may take; fewer steps if the epochs would not fit
    batch_size: int = 64
    seq_len: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    eval_every: int = 50  # steps between two held-out losses on the curve


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """The interpreter's standard library, split by file into training and held-out texts."""

    name: str  # python-3.11.7-stdlib-<hash of the file list>
    train: list[str]
    held_out: list[str]
    files: int
    held_out_files: int
    bytes: int


def load_corpus(stdlib: Path | None = None, max_bytes: int | None = None) -> Corpus:
    """Every readable .py file of a standard library, in path order (with max_bytes, the first
    files that hold that many bytes and one held-out file), each in the held-out set if a hash
    of its relative path says so. The library is this interpreter's, or a copy of another's in
    a folder named after it (python-3.11.7-stdlib): the corpus is named the same either way."""
    root = stdlib or Path(sysconfig.get_paths()["stdlib"])
    label = stdlib.name if stdlib else f"python-{platform.python_version()}-stdlib"
    train, held_out, names, total = [], [], [], 0
    for path in stdlib_sources(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # a few test files are deliberately not UTF-8
            continue
        name = path.relative_to(root).as_posix()
        names.append(name)
        total += len(text.encode("utf-8"))
        (held_out if _is_held_out(name) else train).append(text)
        if max_bytes is not None and total >= max_bytes and held_out:
            break
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    return Corpus(f"{label}-{digest}", train, held_out, len(names), len(held_out), total)


def _is_held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """The texts' token ids end to end, each file followed by <|endoftext|> (so the models learn
    where a file ends, as a real model's pretraining data marks documents)."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += encoded
        ids.append(end)
    return torch.tensor(ids, dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def build_model(size: ModelSize, tokenizer: PreTrainedTokenizerFast, seq_len: int,
                device: torch.device, seed: int) -> torch.nn.Module:
    config = make_config("qwen3", tokenizer, **asdict(size), max_position_embeddings=seq_len,
                         initializer_range=0.02, dtype="bfloat16")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)


def lr_at(step: int, total_steps: int, schedule: Schedule) -> float:
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps)
    return schedule.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model: torch.nn.Module, tokens: torch.Tensor, held_out: torch.Tensor,
          schedule: Schedule, seed: int) -> dict:
    """Train on random windows of `tokens`; return the loss curve and what it took."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    steps = max(1, round(schedule.epochs * len(tokens) / (schedule.batch_size * schedule.seq_len)))
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on norms
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(seed)
    offsets = torch.arange(schedule.seq_len + 1, device=device)
    curve, started, step = [], time.perf_counter(), 0
    best: tuple[float, int, dict] | None = None  # (held-out loss, step, weights on the CPU)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, schedule)
        starts = torch.randint(0, len(tokens) - schedule.seq_len - 1, (schedule.batch_size, 1),
                               device=device, generator=generator)
        window = tokens[starts + offsets].long()  # [batch, seq_len + 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=window[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step == 10 and step < steps:  # the pace is known: fit the rest into the budget
            seconds_per_step = (time.perf_counter() - started) / step
            steps = min(steps, max(step, int(schedule.seconds / seconds_per_step)))
        if step % schedule.eval_every == 0 or step == steps:
            held_out_loss = evaluate(model, held_out, schedule.seq_len, max_windows=32)["loss"]
            point = {"step": step, "tokens": step * schedule.batch_size * schedule.seq_len,
                     "seconds": round(time.perf_counter() - started, 2),
                     "train_loss": round(loss.item(), 4), "held_out_loss": round(held_out_loss, 4)}
            curve.append(point)
            print(json.dumps(point), flush=True)
            if best is None or held_out_loss < best[0]:
                best = (held_out_loss, step, {k: v.detach().to("cpu", copy=True)
                                              for k, v in model.state_dict().items()})
    # Many passes over a small corpus end by memorizing it: keep the weights that did best on
    # files never trained on (the curve says when that was).
    model.load_state_dict(best[2])
    return {"steps": step, "best_step": best[1], "planned_epochs": schedule.epochs,
            "epochs": round(step * schedule.batch_size * schedule.seq_len / len(tokens), 2),
            "tokens_seen": step * schedule.batch_size * schedule.seq_len,
            "seconds": round(time.perf_counter() - started, 1),
            "tokens_per_s": round(step * schedule.batch_size * schedule.seq_len
                                  / (time.perf_counter() - started)),
            "curve": curve,
            "schedule": asdict(schedule)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, held_out: torch.Tensor, seq_len: int,
             max_windows: int) -> dict:
    """Mean next-token loss, perplexity and top-1 accuracy over non-overlapping windows of the
    held-out tokens (at most max_windows of them)."""
    model.eval()
    device = next(model.parameters()).device
    count = min(max_windows, (len(held_out) - 1) // seq_len)
    windows = held_out[: count * seq_len + 1].to(device).long()
    inputs = windows[:-1].view(count, seq_len)
    targets = windows[1:].view(count, seq_len)
    total_loss, correct = 0.0, 0
    for row in range(0, count, 16):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=inputs[row:row + 16]).logits.float()
        total_loss += F.cross_entropy(logits.flatten(0, 1), targets[row:row + 16].flatten(),
                                      reduction="sum").item()
        correct += (logits.argmax(-1) == targets[row:row + 16]).sum().item()
    model.train()
    num_tokens = count * seq_len
    loss = total_loss / num_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "top1_accuracy": correct / num_tokens,
            "tokens": num_tokens}


@torch.no_grad()
def draft_agreement(target: torch.nn.Module, draft: torch.nn.Module, held_out: torch.Tensor,
                    num_prompts: int, prompt_len: int, new_tokens: int, draft_len: int) -> dict:
    """How often the draft's greedy token is the target's, on text the target wrote greedily
    after held-out prompts: the share of drafted tokens greedy speculative decoding accepts, and
    the tokens one target step then yields on average with draft_len drafted tokens."""
    device = next(target.parameters()).device
    target.eval()
    draft.eval()
    spacing = max(prompt_len, (len(held_out) - prompt_len) // num_prompts)
    prompts = torch.stack([held_out[i * spacing: i * spacing + prompt_len]
                           for i in range(num_prompts)]).to(device).long()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        text = target.generate(prompts, attention_mask=torch.ones_like(prompts),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
        draft_logits = draft(input_ids=text[:, :-1]).logits
    # position t of the text the target wrote: its token is the target's greedy choice after
    # text[:t], to be compared with the draft's choice after the same prefix
    written = text[:, prompt_len:]
    agrees = draft_logits[:, prompt_len - 1:].argmax(-1) == written  # [prompts, new_tokens]
    return {"prompts": num_prompts, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "agreement": agrees.float().mean().item(), "draft_len": draft_len,
            "tokens_per_target_step": _tokens_per_step(agrees.tolist(), draft_len)}


def _tokens_per_step(agrees: list[list[bool]], draft_len: int) -> float:
    """Greedy speculative decoding along each row: a step accepts the drafted tokens up to the
    first the target disagrees with (at most draft_len) and adds the target's own token."""
    tokens = steps = 0
    for row in agrees:
        position = 0
        while position < len(row):
            accepted = 0
            while accepted < draft_len and position + accepted < len(row) \
                    and row[position + accepted]:
                accepted += 1
            tokens += accepted + 1
            steps += 1
            position += accepted + 1
    return tokens / steps


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: Path) -> int:
    """The model as a Hugging Face checkpoint in bf16, with the tokenizer; returns its size."""
    if out.exists():
        shutil.rmtree(out)
    model = model.to(torch.bfloat16)
    config = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
        # <|im_end|> ends a chat turn, <|endoftext|> a file, as in Qwen's own checkpoints
        eos_token_id=[config.eos_token_id, config.pad_token_id])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(file.stat().st_size for file in out.iterdir())


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    corpus = load_corpus(args.stdlib and Path(args.stdlib), 200_000 if args.smoke else None)
    tokenizer = train_tokenizer(corpus.train, 512 if args.smoke else args.vocab_size)
    train_tokens, held_out = token_stream(tokenizer, corpus.train), \
        token_stream(tokenizer, corpus.held_out)
    print(f"{corpus.name}: {corpus.files} files ({corpus.held_out_files} held out), "
          f"{len(train_tokens):,} training and {len(held_out):,} held-out tokens", flush=True)
    if args.smoke:
        sizes = {"target": SMOKE, "draft": SMOKE}
        schedules = {name: Schedule(epochs=0.02, seconds=30, batch_size=2, seq_len=64,
                                    warmup_steps=2, eval_every=2) for name in sizes}
    else:
        sizes = {"target": TARGET, "draft": DRAFT}
        schedules = {"target": Schedule(epochs=args.target_epochs, seconds=args.target_seconds),
                     "draft": Schedule(epochs=args.draft_epochs, seconds=args.draft_seconds)}
    result: dict = {"kind": "train-demo", "env": environment(device.type),
                    "corpus": {key: value for key, value in asdict(corpus).items()
                               if key not in ("train", "held_out")},
                    "tokenizer": {"vocab_size": len(tokenizer),
                                  "training_tokens": len(train_tokens),
                                  "held_out_tokens": len(held_out)},
                    "models": {}}
    models = {}
    for role, size in sizes.items():
        schedule = schedules[role]
        model = build_model(size, tokenizer, schedule.seq_len, device, args.seed + len(models))
        num_params = sum(p.numel() for p in model.parameters())
        name = f"{args.name}-{max(1, round(num_params / 1e6))}m" if not args.smoke else role
        print(f"{role} {name}: {num_params:,} parameters", flush=True)
        trained = train(model, train_tokens, held_out, schedule, args.seed)
        scores = evaluate(model, held_out, schedule.seq_len, max_windows=args.eval_windows)
        models[role] = model
        result["models"][role] = {"name": name, "parameters": num_params, "size": asdict(size),
                                  **trained, "held_out": scores}
    seq_len = schedules["target"].seq_len
    result["draft_agreement"] = draft_agreement(
        models["target"], models["draft"], held_out, num_prompts=4 if args.smoke else 64,
        prompt_len=min(64, seq_len // 4), new_tokens=min(128, seq_len // 2), draft_len=4)
    out_dir = Path(args.out_dir)
    for role, model in models.items():
        entry = result["models"][role]
        entry["checkpoint_bytes"] = save(model, tokenizer, out_dir / entry["name"])
        entry["checkpoint"] = (out_dir / entry["name"]).as_posix()
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({role: entry["held_out"] for role, entry in result["models"].items()}))
    print(json.dumps(result["draft_agreement"]))
    if args.results_dir:
        path = Path(args.results_dir) / result_name("train-demo", result["env"],
                                                    corpus.name.split("-stdlib-")[0])
        write_result(path, result)
        print(f"wrote {path}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.demo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="where the two checkpoints go")
    parser.add_argument("--results-dir", help="where the result file goes (none: no file)")
    parser.add_argument("--name", default="pycode", help="the models' names: NAME-<params>m")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps of tiny models on a corner of the corpus (tests)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--stdlib", help="a copy of a standard library to train on, in a folder "
                        "named after it, e.g. python-3.11.7-stdlib (default: this Python's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--target-epochs", type=float, default=16.0)
    parser.add_argument("--target-seconds", type=float, default=240.0)
    parser.add_argument("--draft-epochs", type=float, default=16.0)
    parser.add_argument("--draft-seconds", type=float, default=100.0)
    parser.add_argument("--eval-windows", type=int, default=256,
                        help="held-out windows of 1,024 tokens in the final scores")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
