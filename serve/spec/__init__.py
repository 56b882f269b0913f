"""Speculative decoding: guess several next tokens cheaply, check them all in one step.

A proposer guesses up to k tokens that may follow a request's text (the drafts). The next step
feeds the request's last token and its drafts together, k + 1 query tokens, and samples the
target model at every one of those positions. Each draft that equals the token the target
sampled at its position is accepted, and the target's token after the last accepted one comes
for free: one step yields between 1 and k + 1 tokens, always exactly the tokens decoding one at a
time would have produced (verify.py says why).
"""

from serve.spec.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
