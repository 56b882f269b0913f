"""What each engine step of a throughput run did and how long it took (stage 3 and later).

Attached to an engine whose scheduler returns a SchedulerOutput, it records per step the
requests scheduled, the tokens computed and the wall time of `engine.step()` (which ends by
waiting for the sampled tokens, so its wall time is the step's time on the GPU too). The
summary is what the chapters quote: decode-step times at the batch sizes that occurred, and
how many steps prefilled.
"""

import statistics
import time
from dataclasses import dataclass, field

from bench.step_hook import StepHook

BATCH_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024)  # decode steps by batch size: (prev, this]


@dataclass
class StepLog:
    steps: list[tuple[int, int, float]] = field(default_factory=list)  # seqs, tokens, seconds

    @classmethod
    def attach(cls, engine) -> "StepLog | None":
        """Log each step through engine.step and its scheduler's schedule; None without them."""
        scheduler = getattr(engine, "scheduler", None)
        if not callable(getattr(scheduler, "schedule", None)):
            return None
        log, scheduled = cls(), []  # what the scheduler gave the step in progress

        def logged_step(step):
            scheduled.clear()
            start = time.perf_counter()
            outputs = step()
            seconds = time.perf_counter() - start
            if scheduled and not scheduled[0].is_empty:
                out = scheduled[0]
                log.steps.append((len(out.scheduled), out.num_batched_tokens, seconds))
            return outputs

        hook = StepHook(engine)  # for the engine's life: nothing closes it
        hook.wrap(scheduler, "schedule", lambda schedule: scheduled.append(schedule()) or
                  scheduled[-1])
        hook.wrap(engine, "step", logged_step)
        return log

    def summary(self) -> dict:
        decode = [(seqs, s) for seqs, tokens, s in self.steps if seqs == tokens]
        prefill = [s for seqs, tokens, s in self.steps if seqs != tokens]
        buckets = []
        low = 0
        for high in BATCH_BUCKETS:
            times = [s for seqs, s in decode if low < seqs <= high]
            if times:
                buckets.append({"batch_min": low + 1, "batch_max": high, "steps": len(times),
                                "median_step_ms": statistics.median(times) * 1e3})
            low = high
        return {
            "steps": len(self.steps),
            "decode_steps": len(decode),
            "prefill_steps": len(prefill),  # steps that prefilled something (decodes may ride)
            "mean_batch": statistics.fmean(seqs for seqs, _, _ in self.steps) if self.steps
            else None,
            "max_batch": max((seqs for seqs, _, _ in self.steps), default=None),
            "decode_step_ms_by_batch": buckets,
            "median_prefill_step_ms": statistics.median(prefill) * 1e3 if prefill else None,
        }
