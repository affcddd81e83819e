"""Checkpoints: an atomic on-disk layout (store), Megatron model/optimizer state, and conversion to HF."""
