"""Checkpoint conversion between megarl/megatron distributed checkpoints and HuggingFace folders.

    mcore_to_hf("out/checkpoints/step_00000100", "hf_out", McoreToHfOptions(dtype="bf16"))
    hf_to_mcore("Qwen3-30B-A3B", "init_ckpt", HfToMcoreOptions(target_layout="tp=4,pp=2,ep=8"))

`mcore_to_hf` runs in ONE CPU process (no process group, no model): it reads the checkpoint's global
tensors slice by slice (one layer, or one expert of one layer, at a time; see convert_reader), maps
each slice to HF names with mbridge's own conversion (convert_names) and streams them into safetensors
shards. Peak memory is about one output shard plus the largest single weight, whatever the model
size or the layout it was trained at. Optimizer state is never read.

`hf_to_mcore` writes a model-only checkpoint in the trainer's store layout. megatron's `torch_dist`
format stores global tensors, so one checkpoint loads at every layout; it is produced by building the
model once at TP=PP=EP=1 in a one-rank process group and saving it with megatron itself (so the keys
are exactly the ones `load_megatron_state` asks for). Memory: the whole model (not streamed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch

from megarl.checkpoint.convert_names import (
    VALUE_HEAD_SLICES, SourceSlice, check_config_matches, is_value_checkpoint, plan_slices,
)
from megarl.checkpoint.convert_reader import DCP_METADATA_FILE, MEGATRON_METADATA_FILE, DistCheckpointReader
from megarl.checkpoint.convert_safetensors import (
    DTYPE_CONFIG_NAMES, DTYPES, ShardedSafetensorsWriter, hf_weight_files, is_weight_file, parse_size,
)
from megarl.checkpoint.store import (
    COMPLETE_MARKER, CRITIC_SUBDIR, MEGATRON_SUBDIR, TRAINER_STATE_FILE, CheckpointError, CheckpointStore, read_trainer_state,
    verify_checkpoint,
)

# Copied next to the weights (config.json is rewritten for the output dtype).
HF_SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "tokenizer.model",
)
# hf_to_mcore stores the HF config + tokenizer inside the step folder, so the checkpoint is self-contained.
EMBEDDED_HF_CONFIG_DIR = "hf_config"


class ConversionError(CheckpointError):
    """Bad input to a conversion (raised before anything is written)."""


@dataclass
class McoreToHfOptions:
    max_shard_size: str = "5GB"
    dtype: str | None = None  # bf16 | fp16 | fp32; None keeps the checkpoint's dtype
    hf_config_dir: str | None = None  # config + tokenizer source; default: the run's model.path
    overwrite: bool = False
    verify: bool = False
    progress: bool = True
    model: str = "actor"  # actor | critic (PPO runs save both; the critic converts to *ForTokenClassification)


@dataclass
class HfToMcoreOptions:
    target_layout: str | None = None  # "tp=2,pp=2,ep=2[,etp=..,cp=..,vpp=..,world=..]", validated only
    dtype: str = "fp32"
    overwrite: bool = False
    step: int = 0


@dataclass
class ConversionResult:
    out_dir: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    verify_max_abs_diff: float | None = None  # vs the checkpoint's own dtype (0 when no cast)


# --------------------------------------------------------------------------------- input checks
def resolve_checkpoint(path: str, model: str = "actor") -> tuple[str | None, str]:
    """(step folder or None, megatron dist-checkpoint folder) for a store root (newest complete
    step), a step folder, or a bare megatron folder. CheckpointError for anything else. `model`
    picks the actor's or (PPO) the critic's state inside a step folder."""
    if model not in ("actor", "critic"):
        raise ConversionError(f"unknown model {model!r}; choose actor or critic")
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f"checkpoint {path} does not exist")
    if os.path.exists(os.path.join(path, MEGATRON_METADATA_FILE)) or os.path.exists(os.path.join(path, DCP_METADATA_FILE)):
        return None, path
    is_step = os.path.isdir(os.path.join(path, MEGATRON_SUBDIR)) or os.path.exists(os.path.join(path, TRAINER_STATE_FILE))
    if not is_step:
        latest = CheckpointStore(path).latest()
        if latest is None:
            raise ConversionError(
                f"{path} is neither a checkpoint step folder, a megatron checkpoint, nor a checkpoint root "
                "with a complete step (an interrupted save has no COMPLETE marker)"
            )
        path = latest
    if not os.path.exists(os.path.join(path, COMPLETE_MARKER)):
        raise ConversionError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker): the save was interrupted")
    report = verify_checkpoint(path)
    if not report.ok:
        raise ConversionError(f"checkpoint {path} is damaged (nothing written):\n{report.describe()}\n"
                              "convert another step folder, or check it with `megarl-convert verify`")
    if not report.has_manifest:
        print(f"notice: checkpoint {path} was written before checkpoints had manifests: its files' checksums "
              "cannot be verified", file=sys.stderr, flush=True)
    if model == "critic":
        if not os.path.isdir(os.path.join(path, CRITIC_SUBDIR)):
            raise ConversionError(f"checkpoint {path} has no critic ({CRITIC_SUBDIR}/): only PPO runs save one")
        return path, os.path.join(path, CRITIC_SUBDIR)
    return path, os.path.join(path, MEGATRON_SUBDIR)


def _hf_config_dir(step_dir: str | None, explicit: str | None) -> str:
    if explicit:
        if not os.path.exists(os.path.join(explicit, "config.json")):
            raise ConversionError(f"--hf-config {explicit} has no config.json")
        return os.path.abspath(explicit)
    if step_dir is not None:
        embedded = os.path.join(step_dir, EMBEDDED_HF_CONFIG_DIR)
        if os.path.exists(os.path.join(embedded, "config.json")):
            return embedded
        if os.path.exists(os.path.join(step_dir, TRAINER_STATE_FILE)):
            model_path = read_trainer_state(step_dir).get("config", {}).get("model", {}).get("path")
            if model_path and os.path.exists(os.path.join(model_path, "config.json")):
                return os.path.abspath(model_path)
            if model_path:
                raise ConversionError(
                    f"the run's model folder {model_path} (config.model.path in {TRAINER_STATE_FILE}) has no "
                    "config.json here: pass --hf-config DIR with the model's config and tokenizer"
                )
    raise ConversionError("no HF config for this checkpoint: pass --hf-config DIR (config.json + tokenizer files)")


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse an existing folder unless overwrite; with overwrite remove only previous weight files
    (stale shards would otherwise mix with the new ones). Nothing else is ever deleted."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"output {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ConversionError(f"output folder {out_dir} exists and is not empty: choose a new folder or pass --overwrite")
        for name in os.listdir(out_dir):
            if is_weight_file(name):
                os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def mapping_bridge(hf_config, embedding_rows: int | None = None):
    """An mbridge Bridge used only for its name/tensor mapping: built without megatron's parallel
    state (all parallel sizes 1). `embedding_rows` > vocab_size means a padded vocabulary, which
    mbridge's export slices back to `vocab_size`."""
    from mbridge import AutoBridge
    from mbridge.core.parallel_states import ParallelStates

    from megarl.models.bridge import _pin_output_layer_mapping

    bridge = AutoBridge.from_config(hf_config, dtype=torch.float32, parallel_states=ParallelStates())
    _pin_output_layer_mapping(bridge, hf_config)
    if embedding_rows is not None and embedding_rows != hf_config.vocab_size:
        bridge.make_vocab_size_divisible_by = embedding_rows
        bridge.vocab_size, bridge.padded_vocab_size = hf_config.vocab_size, embedding_rows
    return bridge


@dataclass
class _Source:
    """A validated mcore checkpoint ready to stream."""

    reader: DistCheckpointReader
    slices: list[SourceSlice]
    bridge: object
    hf_config_dir: str
    value_head: bool = False


def open_checkpoint(checkpoint: str, hf_config_dir: str | None = None, model: str = "actor") -> _Source:
    from megarl.models.bridge import load_hf_config_for_bridge

    step_dir, megatron_dir = resolve_checkpoint(checkpoint, model)
    reader = DistCheckpointReader(megatron_dir)
    config_dir = _hf_config_dir(step_dir, hf_config_dir)
    hf_config = load_hf_config_for_bridge(config_dir)
    check_config_matches(reader.tensors, hf_config, config_dir)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    embed = reader.tensors.get("embedding.word_embeddings.weight")
    bridge = mapping_bridge(hf_config, embed.shape[0] if embed is not None else None)
    value_head = is_value_checkpoint(reader.tensors)
    return _Source(reader, plan_slices(reader.tensors, tied and not value_head), bridge, config_dir, value_head)


def iter_hf_tensors(source: _Source, progress: bool = False):
    """(hf_name, tensor) for every HF weight, one checkpoint slice at a time (tensors in saved dtype)."""
    from tqdm import tqdm

    total = sum(source.reader.tensors[s.key].nbytes // max(1, _slice_count(source, s)) for s in source.slices)
    with tqdm(total=total, unit="B", unit_scale=True, desc="mcore-to-hf", disable=not progress) as bar:
        for s in source.slices:
            tensor = source.reader.read(s.key, s.index)
            if s.bridge_name in VALUE_HEAD_SLICES.values():
                names, parts = [s.bridge_name], [tensor]
            else:
                names, parts = source.bridge._weight_to_hf_format(s.bridge_name, tensor)
            for name, part in zip(names, parts):
                yield name, part
            bar.update(tensor.numel() * tensor.element_size())


def _slice_count(source: _Source, s: SourceSlice) -> int:
    return math.prod(source.reader.tensors[s.key].shape[: len(s.index)])


def _write_config(config_dir: str, out_dir: str, dtype: torch.dtype | None, saved_dtype: torch.dtype,
                  value_head: bool = False) -> None:
    with open(os.path.join(config_dir, "config.json")) as f:
        config = json.load(f)
    if value_head:  # loads back as *ForTokenClassification with one label
        from megarl.models.value_head import value_model_config

        config = value_model_config(config)
    name = DTYPE_CONFIG_NAMES[dtype or saved_dtype]
    config["dtype"] = name  # transformers 5
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for side_file in HF_SIDE_FILES:
        source = os.path.join(config_dir, side_file)
        if os.path.exists(source):
            shutil.copy2(source, os.path.join(out_dir, side_file))


def _owning_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, contiguous and sole owner of its storage: mbridge's gate/up and q/k/v
    splits return views of one storage, which safetensors refuses to save as separate tensors."""
    owns_storage = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if tensor.dtype == dtype and owns_storage:
        return tensor
    return torch.empty(tensor.shape, dtype=dtype).copy_(tensor)


def mcore_to_hf(checkpoint: str, out_dir: str, options: McoreToHfOptions | None = None) -> ConversionResult:
    """Convert a megarl/megatron checkpoint (any TP/PP/EP/ETP/CP/VPP layout) to an HF folder."""
    options = options or McoreToHfOptions()
    dtype = _dtype(options.dtype)
    max_shard_bytes = parse_size(options.max_shard_size)
    out_dir = os.path.abspath(out_dir)
    source = open_checkpoint(checkpoint, options.hf_config_dir, options.model)  # every input check before any write
    _prepare_out_dir(out_dir, options.overwrite)
    start = time.perf_counter()
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    count = 0
    saved_dtypes = set()
    for name, tensor in iter_hf_tensors(source, options.progress):
        saved_dtypes.add(tensor.dtype)
        writer.add(name, _owning_tensor(tensor, dtype or tensor.dtype))
        count += 1
    files = writer.close()
    _write_config(source.hf_config_dir, out_dir, dtype, saved_dtypes.pop() if len(saved_dtypes) == 1 else torch.float32,
                  source.value_head)
    result = ConversionResult(out_dir, files, count, writer.total_bytes, time.perf_counter() - start)
    if options.verify:
        result.verify_max_abs_diff = verify_hf_against_checkpoint(out_dir, checkpoint, options.hf_config_dir, options.dtype,
                                                                  options.model)
    return result


def verify_hf_against_checkpoint(hf_dir: str, checkpoint: str, hf_config_dir: str | None = None,
                                 dtype: str | None = None, model: str = "actor") -> float:
    """Re-read every tensor of `hf_dir` and compare it with the checkpoint's. The file must hold
    exactly the checkpoint tensor cast to `dtype` (bit-exact) and no other names. Returns the max
    |file - checkpoint| in the checkpoint's own precision (0.0 without a dtype cast)."""
    from safetensors import safe_open

    source = open_checkpoint(checkpoint, hf_config_dir, model)
    files = hf_weight_files(hf_dir)
    handles: dict[str, object] = {}
    seen, worst = set(), 0.0
    try:
        for name, expected in iter_hf_tensors(source):
            if name not in files:
                raise CheckpointError(f"verify: {name} is missing from {hf_dir}")
            path = files[name]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt").__enter__()
            got = handles[path].get_tensor(name)
            cast = expected.to(_dtype(dtype) or expected.dtype)
            if got.shape != cast.shape or got.dtype != cast.dtype or not torch.equal(got, cast):
                raise CheckpointError(f"verify: {name} in {path} differs from the checkpoint")
            worst = max(worst, (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0)
            seen.add(name)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    extra = sorted(set(files) - seen)
    if extra:
        raise CheckpointError(f"verify: {hf_dir} has tensors the checkpoint does not: {extra[:5]}")
    return worst


# --------------------------------------------------------------------------------- hf -> mcore
def parse_layout(text: str):
    """'tp=2,pp=2,ep=2' -> (ParallelLayout, world size). `world=` defaults to the smallest world the
    layout fits (data parallel 1)."""
    from megarl.distributed import ParallelLayout

    fields, world = {}, None
    allowed = {"tp", "pp", "vpp", "ep", "etp", "cp", "world"}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in allowed or not value.strip().isdigit():
            raise ConversionError(f"bad layout item {part!r} in {text!r}; expected e.g. 'tp=2,pp=2,ep=2' with keys {sorted(allowed)}")
        if key == "world":
            world = int(value)
        else:
            fields[key] = int(value)
    layout = ParallelLayout(**fields)
    if world is None:
        world = math.lcm(layout.model_parallel_size, layout.pp * layout.ep * layout.expert_tensor_parallel_size)
    return layout, world


_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _single_rank_world() -> dict[str, str | None] | None:
    """Set torchrun variables for a one-rank world unless a process group exists. Returns the
    previous values to restore (None when an existing one-rank group is reused)."""
    import torch.distributed as dist

    from megarl.testing.distributed import free_port

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("hf_to_mcore runs in one process; call it outside a multi-rank world")
        return None
    previous = {key: os.environ.get(key) for key in _RANK_ENV}
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    return previous


def _leave_single_rank_world(previous: dict[str, str | None] | None) -> None:
    import torch.distributed as dist

    if previous is None:
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def hf_to_mcore(hf_dir: str, out_root: str, options: HfToMcoreOptions | None = None) -> str:
    """Write `hf_dir`'s weights as a model-only megarl checkpoint under `out_root` (store layout:
    step_XXXXXXXX/{COMPLETE, trainer_state.json, megatron/, hf_config/}). Returns the step folder."""
    from megarl.distributed import ModelShape, ParallelLayout, validate_layout
    from megarl.models.bridge import load_hf_config_for_bridge

    options = options or HfToMcoreOptions()
    dtype = _dtype(options.dtype)
    hf_dir = os.path.abspath(hf_dir)
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        raise ConversionError(f"HF folder {hf_dir} does not exist or has no config.json")
    hf_weight_files(hf_dir)  # raises if there are no weights
    hf_config = load_hf_config_for_bridge(hf_dir)
    if options.target_layout:
        layout, world = parse_layout(options.target_layout)
        validate_layout(layout, world, ModelShape.from_hf_config(hf_config))
    out_root = os.path.abspath(out_root)
    if os.path.isdir(out_root) and os.listdir(out_root) and not options.overwrite:
        raise ConversionError(f"output folder {out_root} exists and is not empty: choose a new folder or pass --overwrite")

    from megatron.core import dist_checkpointing

    from megarl.checkpoint.megatron_state import SAVE_STRATEGY, _model_sharded_state
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.models.builder import build_megatron_model

    previous_env = _single_rank_world()
    try:
        single = ParallelLayout()
        init_distributed(single)
        handle = build_megatron_model(hf_dir, single, trainable=False, dtype=dtype)
        store = CheckpointStore(out_root)
        pending = store.begin(options.step)
        dist_checkpointing.save(_model_sharded_state(handle), pending.megatron_dir, sharded_strategy=SAVE_STRATEGY)
        del handle
        embedded = os.path.join(pending.path, EMBEDDED_HF_CONFIG_DIR)
        os.makedirs(embedded)
        for name in ("config.json", *HF_SIDE_FILES):
            if os.path.exists(os.path.join(hf_dir, name)):
                shutil.copy2(os.path.join(hf_dir, name), os.path.join(embedded, name))
        return store.commit(pending, {
            "model_only": True,  # no optimizer / LR schedule / data-loader state: load with load_optimizer=False
            "source_hf_dir": hf_dir,
            "target_layout": options.target_layout,
            "config": {"model": {"path": hf_dir, "dtype": options.dtype}},
        })
    finally:
        reset_model_parallel()
        _leave_single_rank_world(previous_env)
