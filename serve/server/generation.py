"""The engine streams behind one HTTP request: submit its prompts, gather their outputs, and
stop generating for a client that went away."""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request

from serve.engine.async_engine import AsyncEngine
from serve.engine.errors import InvalidRequestError, PromptTooLongError
from serve.engine.input_processor import Prompt
from serve.engine.outputs import RequestOutput
from serve.sampling_params import SamplingParams
from serve.server.protocol import APIError
from serve.server.structured import renamed, top_field

T = TypeVar("T")


# --8<-- [start:generation]
class Generation:
    """The engine streams behind one HTTP request, one per prompt.

    Whoever starts a Generation closes it; closing aborts every prompt still generating, so a
    client that goes away stops costing GPU time however far its request had got.
    """

    def __init__(
        self, generators: list[AsyncGenerator[RequestOutput, None]], firsts: list[RequestOutput]
    ) -> None:
        self._generators = generators
        self._firsts = firsts
        self._pumps: list[asyncio.Task] = []

    @classmethod
    async def start(
        cls,
        engine: AsyncEngine,
        prompts: list[Prompt],
        params: SamplingParams,
        request_id: str,
        fields: dict[str, str],
        cache_salt: str | None = None,
    ) -> "Generation":
        """Submit every prompt and wait for each one's first output.

        Waiting for the first output is what lets a prompt the engine refuses (too long, empty,
        an output constraint it cannot parse) fail the whole HTTP request with a 400 before a
        single byte of a stream has been sent. `fields` says where the request wrote what the
        engine names: {"prompt": "messages", "structured_outputs": "response_format"}.
        """
        generators = [engine.generate(prompt, params, f"{request_id}-{i}", cache_salt=cache_salt)
                      for i, prompt in enumerate(prompts)]
        firsts = await asyncio.gather(*(anext(g) for g in generators), return_exceptions=True)
        error = next((first for first in firsts if isinstance(first, BaseException)), None)
        if error is None:
            return cls(generators, firsts)
        await cls(generators, []).close()  # abort the prompts the engine did accept
        if isinstance(error, PromptTooLongError):
            raise APIError(str(error), param=fields["prompt"], code="context_length_exceeded")
        if isinstance(error, InvalidRequestError):
            name = error.param or "prompt"
            field = fields.get(name, name)
            raise APIError(renamed(str(error), field), param=top_field(field))
        if isinstance(error, ValueError):
            raise APIError(str(error), param=fields["prompt"])
        raise error

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as each step produces them, the prompts interleaved."""
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
        """Run every prompt to the end; each one's last output, in prompt order."""
        final = {index: output async for index, output in self.outputs()}
        return [final[i] for i in range(len(self._firsts))]

    async def close(self) -> None:
        """Abort whatever is still generating. Safe to call twice, and whether or not
        outputs() ever ran."""
        for pump in self._pumps:
            pump.cancel()  # cancelling a pump closes its engine generator, which aborts
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for generator in self._generators:
            await generator.aclose()  # the ones no pump had started


# --8<-- [end:generation]


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but give up as soon as the client disconnects.

    Without this, a client that times out on a long non-streamed request would leave the engine
    generating its whole answer for nobody.
    """

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
