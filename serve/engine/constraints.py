"""The checks an output constraint passes before the engine accepts its request: it must parse
as a grammar, and a JSON schema may use only keywords the grammar holds the output to, and only
as many optional properties as compile in a moment.

Both run where the request's prompt is tokenized (InputProcessor, off the event loop), so a
constraint the engine cannot honour is refused, naming the request's field, before it reaches the
engine core.
"""

import json
from typing import Any

from serve.engine.errors import InvalidRequestError
from serve.structured.grammar import build_grammar
from serve.structured.params import StructuredOutputsParams

# Keywords xgrammar reads past without enforcing them (found by building schemas with and
# without each, xgrammar 0.2.9): an output it allows could break them, so a schema using one is
# refused, as vLLM refuses it for xgrammar, rather than answered with JSON that fails it.
# ("then", "else", "minContains" and "maxContains" do nothing without "if" or "contains".)
UNENFORCED_KEYWORDS = frozenset({
    "not", "if", "dependentRequired", "dependentSchemas", "dependencies", "maxProperties",
    "propertyNames", "contains",
})
# An object's optional properties (those not in "required") may come in any subset, in order:
# compiling its grammar against the vocabulary takes time that grows faster than their square
# (for the demo model's 4,096 tokens on a laptop-class CPU: 256 take a tenth of a second, 800 a
# second, 1,600 ten, 3,000 more than the engine core's time limit), so one object may have this
# many at most.
MAX_OPTIONAL_PROPERTIES = 256
# Keywords whose value is a schema, a list of schemas, or a map from names to schemas: the
# places schemas nest. Any other keyword's value is data (enum, const, default, examples), whose
# keys are not keywords.
SUBSCHEMA = frozenset({"items", "additionalProperties", "unevaluatedProperties",
                       "unevaluatedItems", "additionalItems", "propertyNames", "contains", "not",
                       "if", "then", "else"})
SUBSCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems", "items"})
SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                            "dependentSchemas"})


# --8<-- [start:check_constraint]
def check_constraint(params: StructuredOutputsParams) -> None:
    """Refuse (InvalidRequestError, param "structured_outputs") a constraint the engine could
    not hold an output to. Building the grammar takes milliseconds; the engine core builds it
    again to compile it against the vocabulary."""
    problem = schema_problem(params.json) if params.kind == "json" else None
    if problem is not None:
        raise InvalidRequestError(f"structured_outputs.json: {problem}", "structured_outputs")
    try:
        build_grammar(params)
    except ValueError as error:  # "structured_outputs.<kind>: <what xgrammar says>"
        raise InvalidRequestError(str(error), "structured_outputs") from None
# --8<-- [end:check_constraint]


def schema_problem(schema: dict | str) -> str | None:
    """What in the schema the engine cannot do (where, as a JSON pointer), or None. A schema
    text that does not parse is build_grammar's to refuse."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError):
            return None
    stack = [(schema, "#")]
    while stack:  # (no recursion: a schema may nest deeper than Python's stack)
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        if problem := _node_problem(node, path):
            return problem
        stack.extend(_subschemas(node, path))
    return None


def _node_problem(node: dict[str, Any], path: str) -> str | None:
    """What in one schema object at `path`, its subschemas aside, the engine cannot do."""
    unenforced = UNENFORCED_KEYWORDS & node.keys()
    if node.get("uniqueItems") is True:
        unenforced.add("uniqueItems")
    if "multipleOf" in node and node.get("type") != "integer":  # (enforced on integers)
        unenforced.add("multipleOf")
    if unenforced:
        return (f"the keyword {min(unenforced)!r} (at {path}) is not supported: the grammar "
                "would not hold the output to it")
    properties, required = node.get("properties"), node.get("required")
    if not isinstance(properties, dict):
        return None
    required = ({name for name in required if isinstance(name, str)}
                if isinstance(required, list) else set())
    num_optional = len(properties.keys() - required)
    if num_optional > MAX_OPTIONAL_PROPERTIES:
        return (f"the object at {path} has {num_optional:,} optional properties (not in "
                f"required); at most {MAX_OPTIONAL_PROPERTIES} are allowed, as the grammar's "
                "compile time grows with their square")
    return None


def _subschemas(node: dict[str, Any], path: str) -> list[tuple[Any, str]]:
    found = []
    for keyword, value in node.items():
        if keyword in SUBSCHEMA_LISTS and isinstance(value, list):
            found += [(item, f"{path}/{keyword}/{i}") for i, item in enumerate(value)]
        elif keyword in SUBSCHEMA_MAPS and isinstance(value, dict):
            found += [(item, f"{path}/{keyword}/{name}") for name, item in value.items()]
        elif keyword in SUBSCHEMA:
            found.append((value, f"{path}/{keyword}"))
    return found
