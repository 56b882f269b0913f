"""The KV pool is cut into fixed-size pages; requests hold them through reference counts.

A request never holds a contiguous region. Its `PageTable` lists the pages that hold its tokens,
in order; token i lives in page table[i // page_size], at offset i % page_size. Pages are taken
on demand: the prompt's pages when the request is admitted, one more each time decoding fills
the last one. Nothing is reserved for tokens not yet generated.

Requests that share a prompt prefix share its pages (the radix cache hands them out), so a page
counts the requests that hold it. Each page is in exactly one of three states:

- free: in the free list, held by nobody, cached by nobody;
- evictable: kept by the radix cache for later requests, held by nobody; the cache gives it
  back when the free list runs dry;
- in use: held by one request or more (cached or not).
"""

from collections import deque
from typing import Protocol

import numpy as np


class Evictor(Protocol):
    """What the allocator asks for pages when its free list runs dry (the radix cache)."""

    def evict(self, num_pages: int) -> int: ...


class PageAllocator:
    """A free list of page ids, and a reference count per page. Every count below is kept up
    to date as pages move, so reading one costs nothing."""

    def __init__(self, num_pages: int, page_size: int, max_tables: int = 0,
                 max_pages_per_table: int = 0) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        # The block table: row r lists the pages of the page table that holds row r, so that a
        # step gathers its requests' pages with one tensor op instead of a Python loop over
        # every page. A table holds a row while it holds pages (max_tables rows: the most
        # requests that hold pages at once, one being admitted included).
        self.block_table = np.zeros((max_tables, max_pages_per_table), dtype=np.int32)
        self.free_rows = list(range(max_tables - 1, -1, -1))
        self.free_pages: deque[int] = deque(range(num_pages))
        self.ref_counts = [0] * num_pages  # requests holding each page
        self.cached = [False] * num_pages  # kept by the radix cache
        self.num_evictable_pages = 0  # cached and held by nobody
        self.evictor: Evictor | None = None  # the radix cache, when prefix caching is on

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def num_available_pages(self) -> int:
        """Pages an allocation can get: the free ones, and the evictable ones."""
        return len(self.free_pages) + self.num_evictable_pages

    @property
    def num_used_pages(self) -> int:
        """Pages held by requests."""
        return self.num_pages - self.num_available_pages

    def num_pages_for(self, num_tokens: int) -> int:
        """Pages that num_tokens tokens occupy."""
        return -(-num_tokens // self.page_size)  # ceil

    def new_table(self) -> "PageTable":
        return PageTable(self)

    # --8<-- [start:allocate]
    def allocate(self, num_pages: int) -> list[int] | None:
        """num_pages pages, each held once by the caller. When the free list is short, the
        cache evicts pages nobody holds; None, changing nothing, if even that is not enough."""
        if num_pages > self.num_available_pages:
            return None
        if num_pages > len(self.free_pages):
            # Every evictable page can go (see RadixCache), so this frees enough.
            self.evictor.evict(num_pages - len(self.free_pages))
        pages = [self.free_pages.popleft() for _ in range(num_pages)]
        for page in pages:
            self.ref_counts[page] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        """One more holder for each page (a request taking pages the cache found)."""
        for page in pages:
            if self.ref_counts[page] == 0:
                assert self.cached[page], f"page {page} is free: allocate it, don't retain it"
                self.num_evictable_pages -= 1
            self.ref_counts[page] += 1

    def release(self, pages: list[int]) -> None:
        """One holder fewer for each page. A page nobody holds any more is free, or evictable
        if the cache keeps it."""
        for page in pages:
            self.ref_counts[page] -= 1
            assert self.ref_counts[page] >= 0, f"page {page} was released more than held"
            if self.ref_counts[page] == 0:
                if self.cached[page]:
                    self.num_evictable_pages += 1
                else:
                    self.free_pages.append(page)
    # --8<-- [end:allocate]

    def mark_cached(self, pages: list[int]) -> None:
        """The cache keeps these pages (a request holds them now: they are in use)."""
        for page in pages:
            assert self.ref_counts[page] > 0 and not self.cached[page]
            self.cached[page] = True

    def uncache(self, pages: list[int]) -> None:
        """The cache lets these pages go; those nobody holds are free."""
        for page in pages:
            self.cached[page] = False
            if self.ref_counts[page] == 0:
                self.num_evictable_pages -= 1
                self.free_pages.append(page)


# --8<-- [start:page_table]
class PageTable:
    """One request's pages, in token order. It holds each page once, whether the page came from
    the cache or from the free list; `release()` gives every one back."""

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.pages: list[int] = []
        self.row: int | None = None  # its row of the allocator's block table, while it has pages

    def adopt(self, pages: list[int]) -> None:
        """Start from pages that already hold the first tokens (a prefix the cache found)."""
        assert not self.pages, "only an empty table adopts a prefix"
        self.allocator.retain(pages)
        self.pages = list(pages)
        self._write(0, pages)

    def _write(self, start: int, pages: list[int]) -> None:
        """Mirror pages, which start at position start, into the block table row (a few times
        per request: once per page_size tokens). Without a block table, nothing to do."""
        allocator = self.allocator
        if not pages or not len(allocator.block_table):
            return
        if self.row is None:
            assert allocator.free_rows, "more tables hold pages than the block table has rows"
            self.row = allocator.free_rows.pop()
        allocator.block_table[self.row, start : start + len(pages)] = pages

    def num_missing_pages(self, num_tokens: int) -> int:
        """Pages still to take before tokens 0..num_tokens-1 all have a slot."""
        return max(0, self.allocator.num_pages_for(num_tokens) - len(self.pages))

    def grow_to(self, num_tokens: int) -> bool:
        """Take pages until tokens 0..num_tokens-1 all have a slot. False, taking nothing, if
        the pool has too few free and evictable pages."""
        if num_tokens <= len(self.pages) * self.allocator.page_size:
            return True  # the usual decode step: its token fits the last page (no call below)
        pages = self.allocator.allocate(self.num_missing_pages(num_tokens))
        if pages is None:
            return False
        self._write(len(self.pages), pages)
        self.pages.extend(pages)
        return True

    def swap_prefix(self, pages: list[int]) -> None:
        """Hold `pages` in place of this table's first len(pages) pages: they hold the same
        tokens (the cache's copy of them), and the copies this table let go are free again."""
        prefix = self.pages[: len(pages)]
        changed = [(old, new) for old, new in zip(prefix, pages, strict=True) if old != new]
        if changed:
            self.allocator.retain([new for _, new in changed])
            self.allocator.release([old for old, _ in changed])
            self.pages[: len(pages)] = pages
            self._write(0, pages)

    def release(self) -> None:
        """Give back every page held, and the block table row. Safe to call twice."""
        self.allocator.release(self.pages)
        self.pages = []
        if self.row is not None:
            self.allocator.free_rows.append(self.row)
            self.row = None
# --8<-- [end:page_table]
