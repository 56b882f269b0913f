"""Speculative decoding: guess several next tokens cheaply, check them all in one step.

A proposer guesses up to k tokens that may follow a request's text (the drafts). The next step
feeds the request's last token and its drafts together and keeps the drafts the target model
agrees with, and the target's own token after them: 1 to k + 1 tokens a step, always exactly
those decoding one at a time would have produced (verify.py says how and why).
"""

from serve.spec.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
