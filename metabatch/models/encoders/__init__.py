"""Encoders: a batch of runs -> joint vectors. v1 (the spec, bit-exact) and v2 (fitted)."""
