"""Methods megarl adds to every vLLM worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`).

vLLM mixes this class into its Worker, so `self` is the worker: `self.model_runner`,
`self.vllm_config`, `self.device`. The engine calls the methods with `llm.collective_rpc(name, ...)`,
which runs them on every worker of the engine (all TP ranks).

A weight push is three calls, so that buckets can arrive one at a time over any transport:

    megarl_begin_weight_update()                    # vLLM layerwise reload: model back to checkpoint layout
    megarl_load_weight_bucket(transport, payload)   # once per bucket; the transport decodes the payload here
    megarl_finish_weight_update()                   # process weights after loading, CPU MoE fix, caches

This is vLLM's own `Worker.reload_weights(weights_iterator=...)` split at the iterator, so a push never
needs all weights in memory at once. vLLM buffers a layer's tensors until the whole layer has arrived
(e.g. all experts of one MoE layer), then processes and copies it into the live kernel tensors.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter

import torch

WORKER_EXTENSION = "megarl.rollout.worker_extension.MegarlWorkerExtension"


class MegarlWorkerExtension:
    def _megarl_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def megarl_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._megarl_model())
        self._megarl_received = Counter()  # hf name -> times received in this push

    @torch.no_grad()
    def megarl_load_weight_bucket(self, transport: str, payload) -> dict:
        """Decode one bucket with the transport's receiver and feed it to the model's loader.
        Returns {"tensors": count, "bytes": size, "digest": optional digest of the received bytes}."""
        from vllm.config import set_current_vllm_config

        from megarl.rollout.weight_sync.base import bucket_digest, get_transport_class

        start = time.perf_counter()
        receiver = get_transport_class(transport)
        named = receiver.receive(payload, device=getattr(self, "device", torch.device("cpu")))
        info = {"tensors": len(named), "bytes": sum(t.numel() * t.element_size() for _, t in named)}
        if isinstance(payload, dict) and payload.get("digest"):
            info["digest"] = bucket_digest(named)
        with set_current_vllm_config(self.vllm_config):
            self._megarl_model().load_weights(iter(named))
        self._megarl_received.update(name for name, _ in named)
        info["seconds"] = time.perf_counter() - start
        return info

    def megarl_finish_weight_update(self) -> dict:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from megarl.rollout.vllm_compat import reprepack_cpu_moe_weights

        model = self._megarl_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        received = getattr(self, "_megarl_received", Counter())
        loaded = set(received)
        repacked = reprepack_cpu_moe_weights(model, loaded)
        # What vLLM's own GPUModelRunner.reload_weights resets after a reload.
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(self.model_runner, reset):
                getattr(self.model_runner, reset)()
        self._megarl_received = Counter()
        # Several senders (one per pipeline stage) feed one engine: a tensor that arrives twice
        # means two senders exported it (wasted bytes, and a race on which copy wins).
        repeated = sorted(name for name, count in received.items() if count > 1)
        return {"tensors": len(loaded), "received": sum(received.values()), "repeated": repeated[:20],
                "cpu_moe_layers_repacked": repacked}

    def megarl_weights_checksum(self) -> str:
        """sha256 over every parameter's bytes as the kernel holds them (names sorted). Equal across
        engines with the same parallel layout iff their weights are bit-identical."""
        h = hashlib.sha256()
        for name, param in sorted(self._megarl_model().named_parameters()):
            h.update(name.encode())
            h.update(param.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()


    def megarl_join_nccl_weight_group(self, host: str, port: int, first_rank: int, world_size: int,
                                      sender_index: int = 0) -> None:
        """Join sender `sender_index`'s `nccl` broadcast group as rank first_rank + this worker's rank."""
        from megarl.rollout.weight_sync.nccl import init_worker_group

        init_worker_group(host, port, first_rank + int(self.rank), world_size, self.device, sender_index)
