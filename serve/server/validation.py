"""The checks a generation request passes before it reaches the engine, and how their failures
read: every invalid field by name, with the rule it breaks, in one message."""

import json
import re
from collections.abc import Sequence
from typing import Any

from serve.engine.errors import InvalidRequestError
from serve.sampling_params import SamplingParams
from serve.server.errors import APIError
from serve.server.protocol import GenerationRequest

MAX_LISTED_PROBLEMS = 10  # a body of 10,000 bad stop strings gets a message, not a novel
MAX_SHOWN_INPUT_CHARS = 40

# Pydantic's wording, made short where the rule is a number: "temperature should be <= 2, got 5".
_RULES = {
    "missing": "is required",
    "greater_than": "should be > {gt}",
    "greater_than_equal": "should be >= {ge}",
    "less_than": "should be < {lt}",
    "less_than_equal": "should be <= {le}",
    "finite_number": "should be a finite number (not NaN or Infinity)",
    "int_parsing_size": "should be an integer",  # a float too large to be one exactly (1e30)
    "model_attributes_type": "should be a JSON object",
    "dict_type": "should be a JSON object",
}
_SUBJECT = re.compile(r"^(Input|String|List|Dictionary|Object|Value) should")


def check_request(request: GenerationRequest, model_names: list[str]) -> SamplingParams:
    """Refuse an unknown model, unsupported fields, or fields at odds with each other; return
    the request's SamplingParams."""
    if request.model is not None and request.model not in model_names:
        shown = request.model if len(request.model) <= 100 else f"{request.model[:100]}..."
        raise APIError(f"The model `{shown}` does not exist. This server "
                       f"serves `{model_names[0]}`.", 404, param="model", code="model_not_found")
    if unsupported := request.unsupported():
        message = "; ".join(f"{what} is not supported yet" for _, what in unsupported)
        raise APIError(message, param=unsupported[0][0], code="unsupported_parameter")
    if conflicts := request.conflicts():
        message = "; ".join(why for _, why in conflicts)
        raise APIError(message, param=conflicts[0][0], code="invalid_value")
    try:
        return request.to_sampling_params()
    except InvalidRequestError as error:  # (an output constraint: it names its field)
        raise APIError(str(error), param=error.param) from error
    except ValueError as error:
        # SamplingParams's messages start with the first bad field's name ("top_k must be ...").
        field = str(error).split(" ", 1)[0]
        param = field if field in type(request).model_fields else None
        raise APIError(str(error), param=param) from error


# --8<-- [start:validation_error]
def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """OpenAI's 400 for a body pydantic refused: one line per problem, `param` the first field.

    "temperature should be <= 2, got 5; prompt[0] should be >= 0, got -3"
    """
    problems: dict[str, str | None] = {}  # line -> its top-level field (dict: ordered, unique)
    for error in errors:
        line, param = _describe(error)
        problems.setdefault(line, param)
    lines = list(problems)
    if len(lines) > MAX_LISTED_PROBLEMS:
        lines = [*lines[:MAX_LISTED_PROBLEMS], f"and {len(lines) - MAX_LISTED_PROBLEMS} more"]
    param = next(iter(problems.values()), None)
    return APIError("; ".join(lines), param=param, code="invalid_value")
# --8<-- [end:validation_error]


def _describe(error: dict[str, Any]) -> tuple[str, str | None]:
    """(one line naming the field and its rule, the top-level field or None for the body)."""
    location = list(error.get("loc", ()))
    if location[:1] == ["body"]:
        location = location[1:]
    if error["type"] == "json_invalid":  # FastAPI puts the character offset in the location
        at = f" at character {location[0]}" if location else ""
        return f"request body is not valid JSON: {error.get('ctx', {}).get('error')}{at}", None
    if not location:
        if isinstance(error.get("input"), bytes):  # FastAPI parses JSON only if the type says so
            return "request body should be JSON, sent as Content-Type: application/json", None
        return f"request body {_rule(error)}", None
    return f"{_path(location)} {_rule(error)}", str(location[0])


def _rule(error: dict[str, Any]) -> str:
    if error["type"] in _RULES:
        bounds = {name: _number(value) for name, value in error.get("ctx", {}).items()}
        rule = _RULES[error["type"]].format(**bounds)
    else:
        message = error["msg"].removeprefix("Value error, ").replace(" after validation", "")
        rule = _SUBJECT.sub("should", message)
        if not rule.startswith("should"):
            rule = f"is invalid: {message}"
    shown = _shown_input(error.get("input"))
    if shown is None or error["type"] == "missing" or " got " in rule:
        return rule
    return f"{rule}, got {shown}"


def _path(location: list) -> str:
    """("messages", 0, "content") -> "messages[0].content"."""
    path = str(location[0])
    for part in location[1:]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _number(value: Any) -> Any:
    """A bound as the client would write it: 0 rather than a float field's 0.0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _shown_input(value: Any) -> str | None:
    """The offending value as JSON, when it is a short scalar worth echoing."""
    if not isinstance(value, str | int | float | bool):
        return None
    shown = json.dumps(value)  # NaN and Infinity as the client wrote them; escapes surrogates
    return shown if len(shown) <= MAX_SHOWN_INPUT_CHARS else None
