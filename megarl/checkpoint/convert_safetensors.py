"""Write a HuggingFace weight folder as a stream: tensors arrive one at a time, a shard is written as
soon as the next tensor would overflow it, so at most one shard is held in memory.

Files: `model.safetensors` (one shard) or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
(the names need N, known only at the end: shards are written under temporary names and renamed).
"""

from __future__ import annotations

import json
import os
import re

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CONFIG_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
INDEX_FILE = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '100MB', '512MiB', '1000' (bytes). Decimal units as HF uses them."""
    match = _SIZE.match(str(text))
    unit = match["unit"].upper() if match else ""
    if unit and not unit.endswith("B"):
        unit += "B"
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 100MB, 512MiB or a byte count")
    size = int(float(match["number"]) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def is_weight_file(name: str) -> bool:
    return name == INDEX_FILE or (name.startswith("model") and name.endswith(".safetensors"))


class ShardedSafetensorsWriter:
    """`add(name, tensor)` per tensor, then `close()` -> the final weight file names."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._temp_names: list[str] = []
        self._weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._weight_map or name in self._shard:
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + size > self.max_shard_bytes:
            self._flush()
        self._shard[name] = tensor.contiguous()
        self._shard_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        temp_name = f".part{len(self._temp_names):05d}.safetensors.tmp"
        save_file(self._shard, os.path.join(self.out_dir, temp_name), metadata={"format": "pt"})
        self._weight_map.update({name: temp_name for name in self._shard})
        self._temp_names.append(temp_name)
        self._shard, self._shard_bytes = {}, 0

    def close(self) -> list[str]:
        if self._shard or not self._temp_names:
            self._flush()
        count = len(self._temp_names)
        final = {t: "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                 for i, t in enumerate(self._temp_names)}
        for temp_name, final_name in final.items():
            os.replace(os.path.join(self.out_dir, temp_name), os.path.join(self.out_dir, final_name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: final[t] for name, t in sorted(self._weight_map.items())}}
            with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
        return list(final.values())


def hf_weight_files(hf_dir: str) -> dict[str, str]:
    """{tensor name: safetensors file path} of an HF folder (index or single file)."""
    from safetensors import safe_open

    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    single = os.path.join(hf_dir, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{hf_dir} has neither {INDEX_FILE} nor model.safetensors")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}
