"""Read single tensors (or one slice of a stacked tensor) from a megatron `torch_dist` checkpoint in
one CPU process: no process group, no model, no GPU.

megatron-core's `torch_dist` format is a torch.distributed.checkpoint (DCP) folder:

    megatron/
      metadata.json      {"sharded_backend": "torch_dist", ...}            (megatron's own marker)
      .metadata          pickled DCP Metadata: per key the GLOBAL shape, dtype and saved chunks
      __<rank>_<i>.distcp  the chunks (each a torch-serialised tensor at a byte offset)
      common.pt          non-tensor state (optimizer param groups, LR schedule)

Each key is one global (unsharded, layout-independent) tensor; a rank saved the chunks it owned. So
reading `key[l]` means: ask DCP's own resharding helper which saved chunks overlap the slice, then
let DCP's FileSystemReader copy exactly those parts into a fresh tensor of the slice's shape. Only
the requested slice (plus the one saved chunk being copied) is ever in memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from megarl.checkpoint.store import CheckpointError

DCP_METADATA_FILE = ".metadata"
MEGATRON_METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class TensorInfo:
    """A global tensor of the checkpoint: `shape` is the unsharded shape (leading layer/expert axes
    included), `dtype` the saved dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def _is_model_tensor_key(key: str) -> bool:
    # Optimizer moments / fp32 main params and the LR schedule are not part of the model; per-module
    # `_extra_state` entries (TE fp8 metadata, None on the local spec) carry no weights.
    return not key.startswith(("optimizer", "lr_scheduler")) and "_extra_state" not in key


class _SliceLoadPlanner:
    """The two LoadPlanner callbacks FileSystemReader.read_data uses: where a read item goes."""

    def __init__(self, targets: dict[str, torch.Tensor]):
        self.targets = targets

    def resolve_tensor(self, read_item) -> torch.Tensor:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        return narrow_tensor_by_index(self.targets[read_item.dest_index.fqn], read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:  # pragma: no cover - only tensors are requested
        raise CheckpointError(f"unexpected byte item {read_item.dest_index.fqn} in a tensor read")


class DistCheckpointReader:
    """Random access to the model tensors of one megatron dist-checkpoint folder.

    Construction validates the folder (megatron marker, DCP metadata, every data file it names present
    and long enough) and raises CheckpointError naming what is missing before any tensor is read.
    """

    def __init__(self, megatron_dir: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = os.path.abspath(megatron_dir)
        _check_megatron_marker(self.path)
        dcp_metadata = os.path.join(self.path, DCP_METADATA_FILE)
        if not os.path.exists(dcp_metadata):
            raise CheckpointError(
                f"{self.path} has no {DCP_METADATA_FILE} (the torch_dist metadata): the save did not finish"
            )
        self._reader = FileSystemReader(self.path)
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as err:  # a truncated pickle, a foreign file
            raise CheckpointError(f"cannot read {dcp_metadata}: {type(err).__name__}: {err}") from err
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        _check_data_files(self.path, self.metadata.storage_data)
        self.tensors: dict[str, TensorInfo] = {}
        self._storage_md: dict[str, Any] = {}
        # saved chunks of each key by the leading (layer) index they cover: a slice read then looks at
        # one layer's chunks, not at all L x E x TP chunks of the key
        self._chunks_by_layer: dict[str, dict[int, list]] = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata) and _is_model_tensor_key(key):
                self.tensors[key] = TensorInfo(key, tuple(md.size), md.properties.dtype)
                self._storage_md[key] = md
                by_layer: dict[int, list] = {}
                for chunk in md.chunks:
                    if len(chunk.offsets):
                        for layer in range(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]):
                            by_layer.setdefault(layer, []).append(chunk)
                self._chunks_by_layer[key] = by_layer
        if not self.tensors:
            raise CheckpointError(f"{self.path} holds no model tensors (keys: {sorted(self.metadata.state_dict_metadata)[:8]} ...)")

    def read(self, key: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        """`key[index]` as a fresh contiguous tensor: `index` picks leading axes (layer, expert)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        info = self.tensors[key]
        if len(index) > len(info.shape) or any(not 0 <= i < n for i, n in zip(index, info.shape)):
            raise IndexError(f"{key}: index {index} outside global shape {info.shape}")
        offsets = tuple(index) + (0,) * (len(info.shape) - len(index))
        sizes = (1,) * len(index) + info.shape[len(index):]
        out_shape = info.shape[len(index):]
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, self._saved_chunks(key, index), [chunk])
        covered = sum(_numel(item.lengths) for item in items)
        if covered != _numel(sizes):
            raise CheckpointError(
                f"{self.path}: the saved chunks of {key} cover {covered} of the {_numel(sizes)} elements of "
                f"slice {index}: the checkpoint is incomplete"
            )
        if len(items) == 1 and (whole := self._read_whole_saved_chunk(items[0])) is not None:
            return whole.reshape(out_shape)
        target = torch.empty(sizes, dtype=info.dtype)
        self._reader.read_data(LoadPlan(items), _SliceLoadPlanner({key: target})).wait()
        return target.reshape(out_shape)

    def _read_whole_saved_chunk(self, item) -> torch.Tensor | None:
        """Fast path (one copy fewer): the slice is exactly one saved chunk stored untransformed
        (megatron's layer/expert-sized shards usually are), so the loaded tensor is the answer."""
        from torch.distributed.checkpoint.filesystem import _create_file_view

        storage = self._reader.storage_data[item.storage_index]
        if getattr(storage, "transform_descriptors", None) or any(item.storage_offsets):
            return None
        with open(os.path.join(self.path, storage.relative_path), "rb") as f:
            saved = torch.load(_create_file_view(f, storage.offset, storage.length), map_location="cpu", weights_only=True)
        if tuple(saved.shape) != tuple(item.lengths):
            return None  # the saved chunk is larger than the slice: let DCP copy the overlap
        return saved.contiguous()

    def _saved_chunks(self, key: str, index: tuple[int, ...]):
        """The key's storage metadata restricted to the saved chunks that can overlap `key[index]`."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = self._storage_md[key]
        if not index:
            return md
        return TensorStorageMetadata(md.properties, md.size, self._chunks_by_layer[key].get(index[0], []))


def _numel(lengths) -> int:
    count = 1
    for size in lengths:
        count *= size
    return count


def _check_megatron_marker(path: str) -> None:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    marker = os.path.join(path, MEGATRON_METADATA_FILE)
    if not os.path.exists(marker):
        raise CheckpointError(f"{path} is not a megatron dist checkpoint: {MEGATRON_METADATA_FILE} is missing")
    try:
        with open(marker) as f:
            backend = json.load(f).get("sharded_backend")
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {marker}: {err}") from err
    if backend != "torch_dist":
        raise CheckpointError(f"{path}: sharded backend {backend!r}; only megatron's 'torch_dist' format is read")


def _check_data_files(path: str, storage_data: dict) -> None:
    """Every .distcp file the metadata refers to exists and reaches the last byte it is said to hold."""
    needed: dict[str, int] = {}
    for info in storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(name for name in needed if not os.path.exists(os.path.join(path, name)))
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is truncated: {len(missing)} of {len(needed)} data files are missing ({', '.join(missing[:6])})"
        )
    short = sorted(name for name, end in needed.items() if os.path.getsize(os.path.join(path, name)) < end)
    if short:
        raise CheckpointError(f"checkpoint {path} is truncated: data files shorter than their metadata says ({', '.join(short[:6])})")
