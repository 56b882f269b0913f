"""Checking drafts: which of a verify row's tokens the request keeps.

A verify row feeds the request's last token x0 and its drafts d1..dk, and the sampler draws the
target's own token at every one of those k + 1 positions, y0..yk, exactly as it would one step
at a time: with the position-keyed noise of serve/core/sampler.py, the token a request samples
at a position depends only on the logits there, its seed and the position. y0 is the token
decoding would have produced next. If d1 == y0, the row's K/V for d1 is the K/V of the true
token there, so y1 is again what decoding would have produced; and so on, up to the first draft
that differs. So the row yields y0..ya, where a drafts matched: always exactly the tokens of
decoding without drafts, 1 to k + 1 of them per step.

This is speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with drafts that are
certain (q puts all its mass on the draft, as for n-gram drafts and vLLM's argmax drafts).
The rule there: accept draft d with probability min(1, p(d) / q(d)) = p(d), and at a rejection
sample from max(p - q, 0), renormalised, which is p with d removed. Here d is accepted when the
target's sample y equals d, which happens with probability p(d); when it does not, y is a draw
from p given y != d, which is that same distribution. Same acceptance, same output law, and
with a seed the very same tokens as without drafts.
"""


# --8<-- [start:accept]
def accepted_tokens(drafts: list[int], samples: list[int]) -> list[int]:
    """The tokens a verify row yields: samples[i] for every draft that matched, up to and with
    the sample at the first mismatch (or the last sample, when every draft matched)."""
    num_accepted = 0
    while num_accepted < len(drafts) and drafts[num_accepted] == samples[num_accepted]:
        num_accepted += 1
    return samples[: num_accepted + 1]
# --8<-- [end:accept]
