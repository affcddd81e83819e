"""Megatron-core models built from HuggingFace folders, and everything that runs them.

- `builder.build_megatron_model(hf_dir, layout, ...) -> ModelHandle`: actor or frozen reference.
- `export.export_hf_weights(handle)`: stream full HF-named tensors (for rollout weight sync, saving).
- `naming`: the local-spec <-> TransformerEngine parameter-name translation mbridge needs on CPU.
- `bridge`: mbridge adapted to megarl's platform layer (layer specs, config overrides, rope_theta).

Submodules are imported explicitly (`from megarl.models.builder import build_megatron_model`); this
package does not import megatron itself.
"""
