"""Speculative decoding: a draft model proposes, the target verifies, rejection sampling, KV rollback."""
