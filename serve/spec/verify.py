"""Checking drafts: which of a verify row's tokens the request keeps.

A verify row feeds the request's last token x0 and its drafts d1..dk, and the sampler draws the
target's own token at each of those k + 1 positions, y0..yk, exactly as decoding one step at a
time would: with the position-keyed noise of serve/core/sampler.py, the token sampled at a
position depends only on the logits there, the seed and the position. y0 is decoding's next
token. If d1 == y0, the row's K/V for d1 is the true token's, so y1 is decoding's too; and so on,
up to the first draft that differs. So the row yields y0..ya, a being the drafts that matched:
always decoding's own tokens, 1 to k + 1 of them per step.

This is speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with certain drafts (q
puts all its mass on the draft, as for n-gram drafts and vLLM's argmax drafts). There draft d is
accepted with probability min(1, p(d) / q(d)) = p(d), and a rejection samples from max(p - q, 0)
renormalised: p with d removed. Here d is accepted when the target's sample y equals d, with
probability p(d), and otherwise y is a draw from p given y != d: the same law, and with a seed
the very same tokens as without drafts.
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
