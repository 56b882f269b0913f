"""Writing one step's new K and V into a layer's pages."""

import torch


# --8<-- [start:store]
def store_kv(k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v: [num_tokens, kv_heads, head_dim] into slots of k_pages, v_pages
    ([num_pages, page_size, kv_heads, head_dim]); slot = page * page_size + offset."""
    k_pages.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_pages.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)
# --8<-- [end:store]
