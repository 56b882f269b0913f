"""Where a step enters an engine's runner, in one place: `execute_model` then `sample` (then
`collect`) from stage 9, `launch` (then `collect`) from stage 7, `execute` from stage 3, before
that the model's forward, which the engine calls itself.
bench/probe.py loads this file as its sibling in older stages' trees, where `bench` is that
stage's own: it imports nothing from bench/ or serve/.

    with StepHook(llm.engine) as hook:          # wraps the step's entry; on exit, all is undone
        hook.before.append(lambda num_tokens: ...)
        hook.stub = lambda inputs: ...          # answers each step: no model runs
        hook.wrap_phase("sample", middleware)   # middleware(sampler, *args), wherever it is
"""

import functools
from contextlib import ExitStack
from unittest import mock

PHASES = {  # the parts of a step in the order it runs them; each is made by the first one found
    "forward": [("runner", "logits"), ("runner", "forward")],  # logits: the runner samples too
    "sample": [("engine", "sampler"), ("runner", "sampler")],  # the engine's up to stage 2
    # one call per sampled token; from stage 7, one per request's part of a step
    "output": [("output_processor", "process_token"), ("output_processor", "process")],
}


class CallThrough(functools.partial):
    """middleware(original, *args) in the original's place; its other attributes stay."""

    def __getattr__(self, name):  # a sampler's other methods
        return getattr(self.args[0], name)


class Stubbed:
    """What a stubbed execute_model hands to sample: the stub's launched step."""

    def __init__(self, launched) -> None:
        self.launched = launched


class StepHook(ExitStack):
    """Wrappers on one engine's calls for a with-block; entering it wraps the step's entry."""

    def __init__(self, engine) -> None:
        super().__init__()
        self.engine, self.runner = engine, getattr(engine, "runner", None)  # None: a core process
        self.entry = next((name for name in ("execute_model", "launch", "execute")
                           if callable(getattr(self.runner, name, None))), None)
        # What the one wrapper of the step's entry calls: before(num_tokens) as a step enters the
        # runner, after() as the runner returns it (stage 3 on; from stage 7, launched, not
        # done), and stub(inputs), if set, in the runner's place (stage 3 on): no model runs.
        self.before, self.after, self.stub = [], [], None

    def __enter__(self) -> "StepHook":
        if self.entry == "execute_model":  # the step is two calls: it returns from the second
            self.wrap(self.runner, self.entry, self._step)
            self.wrap(self.runner, "sample", self._sample)
        elif self.entry:
            self.wrap(self.runner, self.entry, self._step)
        elif self.runner is not None:  # the engine calls the model once a step, token ids first
            self.callback(self.runner.model.register_forward_pre_hook(
                lambda model, args: self._entered(args[0].numel())).remove)
        return self

    def wrap(self, owner, name: str, middleware) -> None:
        """owner.name(*args) returns middleware(original, *args) until the hook is undone."""
        wrapped = CallThrough(middleware, getattr(owner, name))
        self.enter_context(mock.patch.object(owner, name, wrapped))

    def wrap_phase(self, phase: str, middleware) -> bool:
        """wrap() the call that makes this part of a step; False where the engine has none."""
        owners = {"engine": self.engine, "runner": self.runner,
                  "output_processor": getattr(self.engine, "output_processor", None)}
        found = [(owners[owner], name) for owner, name in PHASES[phase]
                 if callable(getattr(owners[owner], name, None))]
        if found:
            self.wrap(*found[0], middleware)
        return bool(found)

    def _step(self, entry, inputs, *args, **kwargs):
        self._entered(inputs.num_tokens)
        if self.entry == "execute_model":  # a stub's answer goes through sample, untouched
            return Stubbed(self.stub(inputs)) if self.stub else entry(inputs, *args, **kwargs)
        result = self.stub(inputs) if self.stub else entry(inputs, *args, **kwargs)
        for callback in self.after:
            callback()
        return result

    def _sample(self, sample, step, *args, **kwargs):
        result = step.launched if isinstance(step, Stubbed) else sample(step, *args, **kwargs)
        for callback in self.after:
            callback()
        return result

    def _entered(self, num_tokens: int) -> None:
        for callback in self.before:
            callback(num_tokens)
