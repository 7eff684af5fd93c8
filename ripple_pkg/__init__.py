"""ripple-flash: LLM FFN weights in flash, read per token by co-activation placement."""
