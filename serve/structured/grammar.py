"""A request's constraint as an xgrammar Grammar, and the token bitmask applied to logits.

Building the Grammar (parsing the schema, regex or EBNF) needs no tokenizer and takes
milliseconds: the server side does it for every structured request before accepting it, so a
constraint xgrammar cannot parse is a 400 naming the field, never an error mid-generation.
Compiling it against the vocabulary is the engine core's (serve/structured/manager.py).
"""

import re
from dataclasses import dataclass

import numpy as np
import torch

from serve.structured.params import StructuredOutputsParams


def xgrammar():
    """xgrammar, imported on first use (a server that constrains nothing never loads it)."""
    try:
        import xgrammar
    except ImportError as error:
        raise RuntimeError("structured output needs xgrammar: `make install` installs it "
                           "(pip install --no-deps xgrammar apache-tvm-ffi)") from error
    return xgrammar


# --8<-- [start:grammar]
def build_grammar(params: StructuredOutputsParams):
    """The constraint as an xgrammar Grammar; ValueError, naming the field, if it does not
    parse. JSON uses fixed separators (", " and ": ", no free whitespace), so a small model
    cannot wander into whitespace, and an object that is complete allows only the end."""
    xgr, kind, spec = xgrammar(), params.kind, params.spec
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False, strict_mode=True)
        if kind == "json_object":  # (OpenAI's: an object, with any properties)
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False,
                                                strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            return xgr.Grammar.from_regex("|".join(re.escape(c) for c in params.choice))
        return xgr.Grammar.from_ebnf(spec)
    except (RuntimeError, ValueError, TypeError) as error:
        # xgrammar's C++ errors start "[12:00:00] /project/cpp/file.cc:94: ": keep the message
        message = re.sub(r"^\[[^\]]*\] [^ ]*:\d+: ", "", str(error).strip())
        raise ValueError(f"structured_outputs.{kind}: {message}") from None
# --8<-- [end:grammar]


@dataclass
class TokenBitmask:
    """The allowed tokens of some sampled rows: bit t of bits[i] (32 tokens per int32 word)
    is 1 when row rows[i] may sample token t."""

    rows: np.ndarray  # [n] int64: which sampled rows are constrained
    bits: np.ndarray  # [n, ceil(vocab / 32)] int32


# --8<-- [start:apply]
def apply_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """Set the logits of every token a row's bitmask does not allow to -inf, in place: the
    sampler then never picks one, greedy or not."""
    rows = torch.from_numpy(mask.rows).to(logits.device, non_blocking=True)
    words = torch.from_numpy(mask.bits).to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().flatten(1)[:, : logits.shape[-1]]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
# --8<-- [end:apply]
