"""Prefix caching (SGLang's RadixAttention): a radix tree over the pages of computed tokens.

The K and V of a request's first n tokens depend on those n tokens alone, so requests that start
alike can share the pages that hold them, and compute only what follows. Every edge of the tree
is a run of whole pages, so each page belongs to one node.

Sharing is visible (a cached prompt is answered sooner, and the API reports how many of its
tokens were cached), so a client could probe what others sent: a request may bring a cache salt
(vLLM's `cache_salt`), and then shares pages only with requests that bring the same salt.

The tree holds no page itself: requests hold pages (reference counts in the allocator), and the
tree marks the pages it keeps as cached. A request that holds a page of a node holds all of that
node and of every node above it (`match` splits a node where a match ends, and a request swaps its
own copies for the tree's pages after `insert`). So the cached pages that nobody holds form whole
subtrees at the bottom of the tree, and evicting leaves bottom-up can free every one of them. A
heap orders the leaves by last use, so that eviction, which a busy server's full pool asks for
at every step, costs what it frees, not a walk of the whole tree.
"""

import heapq
import itertools
from dataclasses import dataclass, field

from serve.core.kv.page_allocator import PageAllocator


@dataclass(eq=False)
class Node:
    tokens: list[int]  # the edge from the parent: len(pages) * page_size tokens
    pages: list[int]  # the pages holding those tokens' K/V, in order
    parent: "Node | None"
    key: tuple  # among its parent's children: its first page of tokens (see _key)
    children: dict[tuple, "Node"] = field(default_factory=dict)
    last_access: int = 0  # the cache's clock when a match or insert last passed through


class RadixCache:
    """Finds the longest cached prefix of a request's tokens, caches what requests computed,
    and gives least recently used pages back to the allocator when it runs dry."""

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.root = Node([], [], None, ())
        self.num_cached_pages = 0
        self.num_evicted_pages = 0  # since the engine started
        self._clock = 0  # ticks once per match or insert: an LRU order that tests can replay
        # Leaves by last use, oldest first: (last_access, order, leaf). An entry is pushed when a
        # leaf is stamped or a node becomes a leaf, and left in place when that entry goes stale
        # (its node stamped again, grown children, or evicted): popping skips it (lazy deletion).
        self._lru: list[tuple[int, int, Node]] = []
        self._order = itertools.count()  # equal clocks never make heapq compare two nodes

    # --8<-- [start:match]
    def match(self, token_ids: list[int], salt: str | None = None) -> tuple[int, list[int]]:
        """The longest prefix of token_ids cached under this salt, in whole pages: (its length
        in tokens, its pages). A node the match ends inside is split there, so a request holds
        whole nodes."""
        pages = [page for node in self._walk(token_ids, salt) for page in node.pages]
        return len(pages) * self.page_size, pages

    def insert(self, token_ids: list[int], pages: list[int], salt: str | None = None) -> list[int]:
        """Cache, under this salt, the first len(pages) pages' worth of token_ids, whose K/V
        `pages` hold. Returns the tree's pages for them: its own where it had those tokens
        already, the given pages (now cached) for the rest. The caller swaps its copies for the
        tree's."""
        token_ids = token_ids[: len(pages) * self.page_size]
        assert len(token_ids) == len(pages) * self.page_size, "a page is cached only when full"
        path = self._walk(token_ids, salt)
        tree_pages = [page for node in path for page in node.pages]
        if len(tree_pages) < len(pages):
            parent = path[-1] if path else self.root
            start = len(tree_pages) * self.page_size
            new_pages = pages[len(tree_pages):]
            leaf = Node(token_ids[start:], new_pages, parent, self._key(token_ids, start, salt),
                        last_access=self._clock)
            parent.children[leaf.key] = leaf
            self._push(leaf)
            self.allocator.mark_cached(new_pages)
            self.num_cached_pages += len(new_pages)
            tree_pages += new_pages
        return tree_pages
    # --8<-- [end:match]

    # --8<-- [start:evict]
    def evict(self, num_pages: int) -> int:
        """Drop the least recently used leaves that no request holds, whole leaves, until
        num_pages pages are free or no such leaf is left; a parent whose last child goes becomes
        a leaf in its turn. Returns the number of pages freed."""
        freed, held = 0, []
        while self._lru and freed < num_pages:
            access, _, leaf = entry = heapq.heappop(self._lru)
            if leaf.parent is None or leaf.children or access != leaf.last_access:
                continue  # stale: evicted, no longer a leaf, or stamped again since
            if self._in_use(leaf):
                held.append(entry)  # (about one leaf per running request)
                continue
            parent = leaf.parent
            del parent.children[leaf.key]
            leaf.parent = None
            self.allocator.uncache(leaf.pages)
            freed += len(leaf.pages)
            if parent is not self.root and not parent.children:
                self._push(parent)
        for entry in held:  # evictable again once its request lets go
            heapq.heappush(self._lru, entry)
        self.num_cached_pages -= freed
        self.num_evicted_pages += freed
        return freed
    # --8<-- [end:evict]

    def _walk(self, token_ids: list[int], salt: str | None) -> list[Node]:
        """The nodes, from the root down, whose tokens token_ids start with, the last one split
        where token_ids leave it; each is stamped as used now."""
        self._clock += 1
        path, node, start = [], self.root, 0
        while child := node.children.get(self._key(token_ids, start, salt)):
            length = self._common_length(child.tokens, token_ids, start)
            if length < len(child.tokens):
                child = self._split(child, length)
            child.last_access = self._clock
            if not child.children:
                self._push(child)
            path.append(child)
            node, start = child, start + length
        return path

    def _common_length(self, edge: list[int], token_ids: list[int], start: int) -> int:
        """How many of edge's tokens token_ids[start:] repeats, in whole pages."""
        size, length = self.page_size, 0
        while length < len(edge) and (edge[length : length + size]
                                      == token_ids[start + length : start + length + size]):
            length += size
        return length

    def _split(self, node: Node, length: int) -> Node:
        """Cut node's edge after `length` tokens; returns the new upper part."""
        num_pages = length // self.page_size
        head = Node(node.tokens[:length], node.pages[:num_pages], node.parent, node.key)
        node.parent.children[head.key] = head  # same first page, same key
        node.tokens, node.pages, node.parent = node.tokens[length:], node.pages[num_pages:], head
        node.key = tuple(node.tokens[: self.page_size])  # (below the head: never a first page)
        head.children[node.key] = node
        return head

    def _key(self, token_ids: list[int], start: int, salt: str | None) -> tuple:
        """The key of the child that holds token_ids[start:]: the tokens of its first page
        (shorter than a page: no child has it). A request's first page (start 0, a child of
        the root) is keyed with its salt too, so a request with another salt finds nothing."""
        page = tuple(token_ids[start : start + self.page_size])
        return (salt, page) if start == 0 else page

    def _push(self, leaf: Node) -> None:
        heapq.heappush(self._lru, (leaf.last_access, next(self._order), leaf))
        # Mostly stale entries by now: rebuild from the leaves (a walk of the tree, once per
        # about as many pushes as the tree has pages, so the heap stays O(cached pages)).
        if len(self._lru) > 2 * self.num_cached_pages + 64:
            self._lru = [(node.last_access, next(self._order), node) for node in self._leaves()]
            heapq.heapify(self._lru)

    def _leaves(self) -> list[Node]:
        leaves, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append(node)
        return leaves

    def _in_use(self, node: Node) -> bool:
        return any(self.allocator.ref_counts[page] for page in node.pages)
