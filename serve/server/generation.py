"""The engine streams behind one HTTP request, and stopping them for a client that went away."""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request

from serve.engine.async_engine import AsyncEngine
from serve.engine.errors import InvalidRequestError, PromptTooLongError
from serve.engine.input_processor import Prompt
from serve.engine.outputs import RequestOutput
from serve.sampling_params import SamplingParams
from serve.server.errors import APIError
from serve.server.structured import renamed, top_field

T = TypeVar("T")


# --8<-- [start:generation]
class Generation:
    """The engine streams behind one HTTP request: per prompt, one per sequence asked for (n,
    or best_of), in order, sequence i of prompt p at index p * per_prompt + i.

    Whoever starts a Generation closes it; closing aborts every sequence still generating, so a
    client that goes away stops costing GPU time however far its request had got.
    """

    def __init__(self, generators: list[AsyncGenerator[RequestOutput, None]],
                 firsts: list[RequestOutput]) -> None:
        self._generators, self._firsts = generators, firsts
        self._pumps: list[asyncio.Task] = []

    @classmethod
    async def start(cls, engine: AsyncEngine, prompts: list[Prompt], params: SamplingParams,
                    request_id: str, fields: dict[str, str], cache_salt: str | None = None,
                    per_prompt: int = 1) -> "Generation":
        """Tokenize every prompt once, submit per_prompt sequences of each, and wait for each
        sequence's first output.

        Waiting for the first output is what lets a prompt the engine refuses (too long, empty,
        an output constraint it cannot parse) fail the whole HTTP request with a 400 before a
        single byte of a stream has been sent. `fields` says where the request wrote what the
        engine names: {"prompt": "messages", "structured_outputs": "response_format"}.
        """
        inputs = await asyncio.gather(*(engine.process(prompt, params) for prompt in prompts),
                                      return_exceptions=True)
        if error := next((i for i in inputs if isinstance(i, BaseException)), None):
            raise _refusal(error, fields)
        generators = []
        for p, engine_input in enumerate(inputs):
            first_id = f"{request_id}-{p * per_prompt}"
            for i in range(per_prompt):
                # The first sequence computes the prompt; the others wait for it, then find
                # its pages in the prefix cache instead of computing n copies.
                child = engine_input.for_sequence(i) if per_prompt > 1 else engine_input
                generators.append(engine.generate(
                    child, None, f"{request_id}-{p * per_prompt + i}", cache_salt=cache_salt,
                    prefill_after=first_id if i else None))
        # (in order: each generator sends its request to the engine before its first wait)
        firsts = await asyncio.gather(*(anext(g) for g in generators), return_exceptions=True)
        error = next((first for first in firsts if isinstance(first, BaseException)), None)
        if error is None:
            share_prompt_logprobs(firsts, per_prompt)
            return cls(generators, firsts)
        await cls(generators, []).close()  # abort the sequences the engine did accept
        raise _refusal(error, fields)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(index, output) as each step produces them, the sequences interleaved."""
        queue: asyncio.Queue = asyncio.Queue()
        finished = object()

        async def pump(index: int, generator: AsyncIterator[RequestOutput]) -> None:
            try:
                async for output in generator:
                    queue.put_nowait((index, output))
            except Exception as error:
                queue.put_nowait((index, error))
            queue.put_nowait((index, finished))

        for index, first in enumerate(self._firsts):
            yield index, first
            if not first.finished:
                generator = self._generators[index]
                self._pumps.append(asyncio.create_task(pump(index, generator)))
        remaining = len(self._pumps)
        while remaining:
            index, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item

    async def final_outputs(self) -> list[RequestOutput]:
        """Run every sequence to the end; each one's last output, in index order, with the
        prompt's log-probabilities (which come with the first output)."""
        final = {index: output async for index, output in self.outputs()}
        outputs = [final[i] for i in range(len(self._firsts))]
        for output, first in zip(outputs, self._firsts, strict=True):
            output.prompt_logprobs = first.prompt_logprobs
        return outputs

    async def close(self) -> None:
        """Abort whatever is still generating. Safe to call twice, and whether or not
        outputs() ever ran."""
        for pump in self._pumps:
            pump.cancel()  # cancelling a pump closes its engine generator, which aborts
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for generator in self._generators:
            await generator.aclose()  # the ones no pump had started
# --8<-- [end:generation]


def share_prompt_logprobs(firsts: list[RequestOutput], per_prompt: int) -> None:
    """Give each prompt's other sequences the first one's prompt log-probabilities (one prompt,
    computed once)."""
    for index, first in enumerate(firsts):
        if index % per_prompt:
            first.prompt_logprobs = firsts[index - index % per_prompt].prompt_logprobs


def _refusal(error: BaseException, fields: dict[str, str]) -> BaseException:
    """The error a refused prompt answers with: a 400 naming the request's field, or the
    error itself when it is not the request's fault."""
    if isinstance(error, PromptTooLongError):
        return APIError(str(error), param=fields["prompt"], code="context_length_exceeded")
    if isinstance(error, InvalidRequestError):
        name = error.param or "prompt"
        field = fields.get(name, name)
        return APIError(renamed(str(error), field), param=top_field(field))
    if isinstance(error, ValueError):
        return APIError(str(error), param=fields["prompt"])
    return error


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but give up as soon as the client disconnects: a client that timed out on
    a long non-streamed request would otherwise leave the engine generating for nobody."""

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task = asyncio.ensure_future(work)
    listener = asyncio.create_task(wait_for_disconnect())
    try:
        await asyncio.wait({work_task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not work_task.done():
            work_task.cancel()
        await asyncio.gather(listener, work_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnect()
    return work_task.result()
