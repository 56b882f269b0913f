"""The KV pool is cut into fixed-size pages handed out from a free list, as sequences grow.

A request never holds a contiguous region. Its `PageTable` lists the pages that hold its tokens,
in order; token i lives in page table[i // page_size], at offset i % page_size. Pages are taken
on demand: the prompt's pages when the request is admitted, one more each time decoding fills
the last one. Nothing is reserved for tokens not yet generated.
"""

from collections import deque


class PageAllocator:
    """A free list of page ids."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.free_pages: deque[int] = deque(range(num_pages))

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self.free_pages)

    def num_pages_for(self, num_tokens: int) -> int:
        """Pages that num_tokens tokens occupy."""
        return -(-num_tokens // self.page_size)  # ceil

    def new_table(self) -> "PageTable":
        return PageTable(self)


# --8<-- [start:page_table]
class PageTable:
    """One request's pages, in token order. Owns them: `release()` gives every page back."""

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.pages: list[int] = []

    def num_missing_pages(self, num_tokens: int) -> int:
        """Pages still to take before tokens 0..num_tokens-1 all have a slot."""
        return max(0, self.allocator.num_pages_for(num_tokens) - len(self.pages))

    def grow_to(self, num_tokens: int) -> bool:
        """Take pages until tokens 0..num_tokens-1 all have a slot. False, taking nothing, if
        the pool has too few free pages."""
        missing = self.num_missing_pages(num_tokens)
        free_pages = self.allocator.free_pages
        if missing > len(free_pages):
            return False
        self.pages.extend(free_pages.popleft() for _ in range(missing))
        return True

    def release(self) -> None:
        """Give back every page held. Safe to call twice."""
        self.allocator.free_pages.extend(self.pages)
        self.pages = []
# --8<-- [end:page_table]
