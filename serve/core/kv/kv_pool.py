"""The KV cache: one preallocated pool of pages for every layer, shared by all requests."""

import torch


class KVPool:
    """K and V for every layer: [num_layers, num_pages + 1, page_size, kv_heads, head_dim] each.
    One layer's layout, [pages, page_size, kv_heads, head_dim], is what FlashInfer calls NHD;
    the torch backend reads the same tensors. Pages 0 .. num_pages-1 are the requests'; the one
    after them, pad_page, belongs to nobody: the padding rows of a CUDA-graph batch write their
    K/V there and read it back, so no request's page is ever touched by them."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_pages + 1, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_pages, self.page_size = num_pages, page_size
        self.pad_page = num_pages

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (K pages, V pages), views into the pool."""
        return self.k[index], self.v[index]

    def describe(self) -> str:
        return (f"{self.num_pages} pages x {self.page_size} tokens = "
                f"{self.num_pages * self.page_size} tokens, {self.num_bytes / 2**30:.2f} GiB")

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * element
