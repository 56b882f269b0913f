"""What a request's output must match: vLLM's `structured_outputs` parameters."""

import json
from dataclasses import dataclass

MAX_CHOICES = 1024  # a longer list is a grammar better written as a regex or a schema
MAX_GRAMMAR_CHARS = 100_000  # a schema, regex or EBNF text larger than this is refused


# --8<-- [start:params]
@dataclass
class StructuredOutputsParams:
    """Exactly one constraint (vLLM's names): json (a JSON schema, as a dict or its text),
    regex, choice (the output is one of these strings), grammar (EBNF, in xgrammar's dialect),
    or json_object (any JSON object)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
# --8<-- [end:params]

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + ["json_object"] * bool(self.json_object)
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, "
                             f"grammar or json_object, got {given or 'none'}")
        if self.choice is not None:
            if not self.choice or len(self.choice) > MAX_CHOICES or not all(
                    isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be 1 to {MAX_CHOICES} "
                                 "non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.json is not None and not isinstance(self.json, dict | str):
            raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        try:
            spec = self.spec
        except RecursionError:  # a schema nested deeper than Python's recursion limit
            raise ValueError("structured_outputs.json is nested too deeply") from None
        if len(spec) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"structured_outputs.{self.kind} is longer than "
                             f"{MAX_GRAMMAR_CHARS:,} characters")

    @property
    def kind(self) -> str:
        """Which constraint: json, regex, choice, grammar or json_object."""
        return next((name for name in ("json", "regex", "choice", "grammar")
                     if getattr(self, name) is not None), "json_object")

    @property
    def spec(self) -> str:
        """The constraint as one string (a JSON schema serialized in its own key order: the
        order of "properties" is the order the output writes them in)."""
        value = getattr(self, self.kind) if self.kind != "json_object" else ""
        if isinstance(value, dict):
            return json.dumps(value, separators=(",", ":"))
        if isinstance(value, list):
            return json.dumps(value)
        return value
