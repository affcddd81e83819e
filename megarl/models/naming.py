"""Parameter names of megatron-core's two GPT layer specs, and the one translation between them.

mbridge maps HF checkpoint names to megatron names written for the TransformerEngine (TE) spec. On
CPU the model is built from megatron's local spec, whose modules (and so parameter names) differ:

    local spec                                         TE spec (what mbridge understands)
    layers.{l}.input_layernorm.weight                  layers.{l}.self_attention.linear_qkv.layer_norm_weight
    layers.{l}.pre_mlp_layernorm.weight  (dense MLP)   layers.{l}.mlp.linear_fc1.layer_norm_weight
    layers.{l}.pre_mlp_layernorm.weight  (MoE layer)   unchanged (TE cannot fuse a norm into a router)
    layers.{l}.mlp.experts.local_experts.{i}.linear_fc{k}.weight
                                                       layers.{l}.mlp.experts.linear_fc{k}.weight{i}

(The same fused-norm renaming is what megatron itself declares as the local spec's
`sharded_state_dict_keys_map` for dense layers.) A torch norm module may also nest its parameters one
level down (`input_layernorm.norm.weight`); that level is dropped.

`bridge_name_map(local_names, spec)` builds, for one model chunk, the map from the chunk's own
parameter names to mbridge's names. Loading reads it backwards (mbridge name -> parameter), export
reads it forwards: one mapping, so the two directions cannot disagree. Under the TE spec the map is
the identity: no translation happens on GPU.

Pure string code: importable without megatron.
"""

from __future__ import annotations

import re
from typing import Iterable, Literal

LayerSpecKind = Literal["te", "local"]

_LAYER = r"(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.)"
_NORM_SUFFIX = r"(?:norm\.)?(?P<kind>weight|bias)"
_INPUT_NORM = re.compile(_LAYER + r"input_layernorm\." + _NORM_SUFFIX + "$")
_PRE_MLP_NORM = re.compile(_LAYER + r"pre_mlp_layernorm\." + _NORM_SUFFIX + "$")
# q/k norms and the final norm keep their names; only a nested torch-norm level is dropped.
_OTHER_NORM = re.compile(r"(?P<module>.*(?:q_layernorm|k_layernorm|final_layernorm))\." + _NORM_SUFFIX + "$")
_LOCAL_EXPERT = re.compile(
    _LAYER + r"mlp\.experts\.local_experts\.(?P<expert>\d+)\.(?P<linear>linear_fc[12])\.(?P<kind>weight|bias)$"
)
_ROUTER = re.compile(_LAYER + r"mlp\.router\.weight$")


def is_moe_expert_name(bridge_name: str) -> bool:
    """True for a routed expert's weight in mbridge naming (`...mlp.experts.linear_fc1.weight3`)."""
    return ".mlp.experts.linear_fc" in bridge_name


def split_expert_name(bridge_name: str) -> tuple[str, int]:
    """`...mlp.experts.linear_fc1.weight3` -> (`...mlp.experts.linear_fc1.weight`, 3)."""
    match = re.match(r"(?P<stem>.*\.(?:weight|bias))(?P<expert>\d+)$", bridge_name)
    if match is None or not is_moe_expert_name(bridge_name):
        raise ValueError(f"{bridge_name!r} is not a routed expert parameter name in mbridge naming")
    return match["stem"], int(match["expert"])


def _local_to_te(name: str, moe_layers: set[str]) -> str:
    """One local-spec parameter name in TE naming; `moe_layers` are the layer prefixes with a router."""
    if match := _INPUT_NORM.match(name):
        return f"{match['prefix']}self_attention.linear_qkv.layer_norm_{match['kind']}"
    if match := _PRE_MLP_NORM.match(name):
        if match["prefix"] in moe_layers:
            return f"{match['prefix']}pre_mlp_layernorm.{match['kind']}"
        return f"{match['prefix']}mlp.linear_fc1.layer_norm_{match['kind']}"
    if match := _LOCAL_EXPERT.match(name):
        return f"{match['prefix']}mlp.experts.{match['linear']}.{match['kind']}{match['expert']}"
    if match := _OTHER_NORM.match(name):
        return f"{match['module']}.{match['kind']}"
    return name


def bridge_name_map(local_names: Iterable[str], spec: LayerSpecKind) -> dict[str, str]:
    """{model chunk's parameter name: mbridge (TE-spec) name} for every name given.

    `local_names` are one model chunk's state-dict names (layer indices local to the chunk, expert
    indices local to the EP rank; both stay local here). `_extra_state` entries are skipped.
    Raises ValueError if two parameters would get the same name (a translation bug, caught early).
    """
    names = [n for n in local_names if not n.endswith("_extra_state")]
    if spec == "te":
        if any(".local_experts." in n for n in names):
            raise ValueError(
                "TE layer spec built with per-expert modules (moe_grouped_gemm=False): mbridge maps only "
                "TE grouped experts (`mlp.experts.linear_fc1.weight{i}`); enable moe_grouped_gemm on GPU"
            )
        return {n: n for n in names}
    if spec != "local":
        raise ValueError(f"unknown layer spec kind {spec!r}; expected 'te' or 'local'")
    moe_layers = {m["prefix"] for n in names if (m := _ROUTER.match(n))}
    mapping = {n: _local_to_te(n, moe_layers) for n in names}
    if len(set(mapping.values())) != len(mapping):
        seen: dict[str, str] = {}
        for local, bridged in mapping.items():
            if bridged in seen:
                raise ValueError(f"{seen[bridged]!r} and {local!r} both translate to {bridged!r}")
            seen[bridged] = local
    return mapping


def current_layer_spec_kind() -> LayerSpecKind:
    """'te' when the platform builds TransformerEngine layers (GPU), else 'local' (CPU)."""
    from megarl.platform.layer_specs import uses_transformer_engine

    return "te" if uses_transformer_engine() else "local"
