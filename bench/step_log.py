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

BATCH_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024)  # decode steps by batch size: (prev, this]


@dataclass
class StepLog:
    steps: list[tuple[int, int, float]] = field(default_factory=list)  # seqs, tokens, seconds

    @classmethod
    def attach(cls, engine) -> "StepLog | None":
        """Wrap engine.step and engine.scheduler.schedule; None for an engine without them."""
        scheduler = getattr(engine, "scheduler", None)
        if not callable(getattr(scheduler, "schedule", None)):
            return None
        log, schedule, step = cls(), scheduler.schedule, engine.step
        scheduled: list = []

        def logged_schedule():
            out = schedule()
            scheduled.append(out)
            return out

        def logged_step():
            scheduled.clear()
            start = time.perf_counter()
            outputs = step()
            seconds = time.perf_counter() - start
            if scheduled and not scheduled[0].is_empty:
                out = scheduled[0]
                log.steps.append((len(out.scheduled), out.num_batched_tokens, seconds))
            return outputs

        scheduler.schedule, engine.step = logged_schedule, logged_step
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
