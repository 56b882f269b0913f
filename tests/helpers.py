"""Small helpers shared by the server tests."""

import time


def wait_until(condition, timeout: float = 5.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def generate_on_cpu(model: str, prompts, params, **config) -> tuple[list[tuple], list]:
    """Run prompts through a fresh LLM on the CPU: each request's (token ids, text, finish
    reason), and every stats snapshot the engine took (LLM.generate takes one at its end)."""
    from serve import LLM

    snapshots = []
    llm = LLM(model, device="cpu", **config)
    take = llm.engine.take_stats
    llm.engine.take_stats = lambda: snapshots.append(take()) or snapshots[-1]
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
            for o in outputs], snapshots
