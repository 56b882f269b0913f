"""Stage 2's page allocator: the KV pool is cut into fixed-size pages handed out from a free list.

A request never holds a contiguous region any more. Its `PageTable` lists the pages that hold its
tokens, in order; token i lives in page table[i // page_size], at offset i % page_size.
"""

from collections import deque


class PageAllocator:
    """A free list of page ids, plus pages promised to admitted requests but not yet taken."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.free_pages: deque[int] = deque(range(num_pages))
        self.num_reserved = 0  # promised to page tables, not yet allocated

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def num_available_pages(self) -> int:
        """Free pages that no admitted request has been promised."""
        return len(self.free_pages) - self.num_reserved

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)  # ceil

    # --8<-- [start:reserve]
    def reserve(self, max_tokens: int) -> "PageTable | None":
        """Promise enough pages for a request that may grow to max_tokens, or None if they are
        not there. Promising up front means a running batch can never run out of pages."""
        needed = self.pages_for(max_tokens)
        if needed > self.num_available_pages:
            return None
        self.num_reserved += needed
        return PageTable(self, needed)
    # --8<-- [end:reserve]


# --8<-- [start:page_table]
class PageTable:
    """One request's pages, in token order. Owns them: `release()` gives every page back."""

    def __init__(self, allocator: PageAllocator, num_promised: int) -> None:
        self.allocator = allocator
        self.pages: list[int] = []
        self.num_promised = num_promised  # pages this table may still take

    def grow_to(self, num_tokens: int) -> None:
        """Make sure pages exist for tokens 0..num_tokens-1, taking promised pages as needed."""
        allocator = self.allocator
        missing = allocator.pages_for(num_tokens) - len(self.pages)
        if missing > self.num_promised:
            raise RuntimeError(f"a page table grew past the {self.num_promised} pages promised")
        for _ in range(missing):
            self.pages.append(allocator.free_pages.popleft())
        self.num_promised -= max(missing, 0)
        allocator.num_reserved -= max(missing, 0)

    def pages_for(self, num_tokens: int) -> list[int]:
        """The pages that hold tokens 0..num_tokens-1 (a table may hold one page ahead)."""
        return self.pages[: self.allocator.pages_for(num_tokens)]

    def release(self) -> None:
        """Give back every page held and every page promised. Safe to call twice."""
        self.allocator.free_pages.extend(self.pages)
        self.allocator.num_reserved -= self.num_promised
        self.pages, self.num_promised = [], 0
# --8<-- [end:page_table]
