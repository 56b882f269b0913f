"""Structured output: constrain a request's tokens to a grammar (JSON schema, regex, choice,
EBNF), by masking the logits of every token the grammar does not allow before sampling.

xgrammar does the grammar work: it compiles a grammar against the tokenizer's vocabulary once,
then a matcher per request follows the tokens and fills, each step, a bitmask of the tokens
allowed next (one bit per token).
"""

from serve.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
