"""The KV cache's memory: the pool of pages, who holds which page, and the radix tree that keeps
pages of computed prefixes for later requests."""
