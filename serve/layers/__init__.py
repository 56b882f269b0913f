"""Building blocks shared by every model: norms, rotary embedding, linear layers, attention."""
