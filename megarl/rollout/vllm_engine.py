"""The vLLM rollout engine: one `vllm.LLM` behind megarl's engine interface.

Used as a Ray actor (`megarl.rollout.engine_group.EngineGroup` makes N of them) or directly in the
caller's process. On CPU the engine runs inside this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).

Log-prob convention (`VLLMEngineConfig.logprobs_mode`, vLLM's own option):
- "processed_logprobs" (megarl's default): log-probs of the distribution the token was actually
  sampled from — logits / temperature, then top-k / top-p masking, then log-softmax. With top_k=0,
  top_p=1 the trainer reproduces them as log_softmax(logits / temperature): it must divide its
  logits by the rollout temperature (`vocab_parallel_logprobs_entropy(..., temperature=T)`).
- "raw_logprobs" (vLLM's default): log_softmax(logits), before temperature and filters; the trainer
  then uses temperature 1.
Mixing the two makes importance ratios / mismatch metrics measure the convention, not the drift.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from megarl.rollout.types import EngineHealth, RolloutRequest, SampleResult, SamplingOptions
from megarl.rollout.worker_extension import WORKER_EXTENSION

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # megarl config dtype -> vLLM's
CPU_KV_CACHE_GIB = 1.0  # VLLM_CPU_KVCACHE_SPACE of a CPU engine unless cpu_kv_cache_gb says otherwise


@dataclass(frozen=True)
class VLLMEngineConfig:
    """What one engine is. `tensor_parallel_size` > 1 uses vLLM's Ray executor: its workers go on
    the bundles of the placement group the engine actor was scheduled in (see placement.py).
    `enable_sleep_mode` is GPU-only (vLLM's CPU worker has no sleep mode). `cpu_kv_cache_gb` sets
    VLLM_CPU_KVCACHE_SPACE on CPU. `engine_kwargs` go to `vllm.LLM` as they are."""

    model: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    logprobs_mode: str = "processed_logprobs"
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False
    cpu_kv_cache_gb: float = CPU_KV_CACHE_GIB
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not os.path.isdir(self.model):
            raise ValueError(f"model must be a local HF checkpoint folder (no hub downloads): {self.model!r}")

    @classmethod
    def from_config(cls, cfg, device) -> "VLLMEngineConfig":
        """From a MegaRLConfig and its DevicePlan (megarl.platform.device_plan with the rollout
        settings): the plan decides sleep mode and eager mode, the config everything else. The
        context holds the prompt and every turn's response."""
        r = cfg.rollout
        return cls(
            model=cfg.model.path, tensor_parallel_size=r.tensor_parallel_size, dtype=VLLM_DTYPES[cfg.model.dtype],
            max_model_len=cfg.data.max_prompt_length + r.max_new_tokens * max(1, r.max_turns), seed=cfg.trainer.seed,
            logprobs_mode="processed_logprobs", enforce_eager=device.enforce_eager,
            gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=device.enable_sleep_mode,
            engine_kwargs={k: v for k, v in {"max_num_batched_tokens": r.max_num_batched_tokens}.items() if v},
        )

    @classmethod
    def for_cpu_tests(cls, model: str, **changes) -> "VLLMEngineConfig":
        """The fast CPU settings: fp32, eager, small context and KV cache."""
        return cls(**{"model": model, "dtype": "float32", "enforce_eager": True, "max_model_len": 1024, **changes})


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def runtime_dir() -> str:
    """Where vLLM/HF/Ray caches and temp files go: <repo>/.runtime (never $HOME or /tmp)."""
    return os.environ.get("MEGARL_RUNTIME_DIR", os.path.join(repo_root(), ".runtime"))


def engine_process_env(config: VLLMEngineConfig, *, cpu: bool) -> dict[str, str]:
    """Environment an engine process needs; set before vLLM is imported (Ray runtime_env)."""
    rt = runtime_dir()
    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": os.path.join(rt, "vllm"),
        "HF_HOME": os.path.join(rt, "hf"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(rt, "inductor"),
        "XDG_CACHE_HOME": os.path.join(rt, "xdg"),
        "TMPDIR": os.path.join(rt, "tmp"),
        # vLLM imports megarl's worker extension by name, in every worker process.
        "PYTHONPATH": os.pathsep.join(p for p in [repo_root(), os.environ.get("PYTHONPATH", "")] if p),
        # The engine core runs in the actor's own process (CPU and GPU). Its workers are then this
        # process (TP 1) or vLLM's Ray workers (TP > 1): all of them are Ray processes that can
        # resolve the object refs of a weight push, and collective_rpc arguments are passed by
        # reference or pickled by Ray, never through vLLM's msgpack RPC (which cannot carry them).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    if cpu:
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(max(1, int(config.cpu_kv_cache_gb))),
            TORCH_COMPILE_DISABLE="1",  # else +35-40 s compiling the sampler
        )
    return env


class VLLMEngine:
    """One vLLM engine. Every public method is also a Ray actor method."""

    def __init__(self, config: VLLMEngineConfig, engine_index: int = 0):
        from megarl.platform.device import accelerator_available

        self.config = config
        self.engine_index = engine_index
        self.cpu = not accelerator_available()
        if self.cpu and config.enable_sleep_mode:
            raise ValueError("enable_sleep_mode is not supported by vLLM on CPU; leave it False (sleep() is a no-op)")
        if self.cpu and config.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 needs GPUs (vLLM's Ray executor); use 1 on CPU")
        for key, value in engine_process_env(config, cpu=self.cpu).items():
            os.environ.setdefault(key, value)
        os.makedirs(os.environ["TMPDIR"], exist_ok=True)

        from vllm import LLM

        kwargs = dict(
            model=config.model,
            tensor_parallel_size=config.tensor_parallel_size,
            dtype=config.dtype,
            seed=config.seed,
            logprobs_mode=config.logprobs_mode,
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            worker_extension_cls=WORKER_EXTENSION,
        )
        if config.max_model_len:
            kwargs["max_model_len"] = config.max_model_len
        if not self.cpu:
            kwargs.update(gpu_memory_utilization=config.gpu_memory_utilization, enable_sleep_mode=config.enable_sleep_mode)
            if config.tensor_parallel_size > 1:
                kwargs["distributed_executor_backend"] = "ray"
        kwargs.update(config.engine_kwargs)
        start = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - start
        self.tokenizer = self.llm.get_tokenizer()
        self.weights_version = 0
        self.sleeping = False
        self.updating = False

    # ---------------------------------------------------------------- generation
    def prompt_token_ids(self, request: RolloutRequest) -> list[int]:
        """The request's prompt as token ids (chat template with generation prompt for messages)."""
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        ids = self.tokenizer.apply_chat_template(request.messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def generate(self, requests: list[RolloutRequest], sampling: SamplingOptions = SamplingOptions()) -> list[list[SampleResult]]:
        """n samples per request (`request.sampling` overrides `sampling`). Returns
        `results[i][j]` = sample j of request i, in request order."""
        if self.sleeping:
            raise RuntimeError(f"engine {self.engine_index} is asleep; call wake_up() before generate()")
        if self.updating:
            # Between begin and finish the model's layers are being swapped (some sit on the meta
            # device): generating now would crash or mix weights of two versions.
            raise RuntimeError(f"engine {self.engine_index} is in the middle of a weight push; generate after it finished")
        from vllm import SamplingParams

        prompts, params = [], []
        for request in requests:
            s = request.sampling or sampling
            prompts.append({"prompt_token_ids": self.prompt_token_ids(request)})
            params.append(
                SamplingParams(
                    n=s.n,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    max_tokens=s.max_tokens,
                    stop=list(s.stop) or None,
                    stop_token_ids=list(s.stop_token_ids) or None,
                    seed=s.seed,
                    ignore_eos=s.ignore_eos,
                    logprobs=0,  # the sampled token's log-prob only
                )
            )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._to_results(i, request, out) for i, (request, out) in enumerate(zip(requests, outputs, strict=True))]

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs of given token sequences under the engine's current weights (prompt log-probs):
        `out[b][t]` = log p(sequences[b][t] | sequences[b][:t]) for t >= 1, and out[b][0] = 0.0 — the
        layout of `megarl.models.batch` log-probs. Temperature 1 (no processing), nats."""
        if self.sleeping or self.updating:
            raise RuntimeError(f"engine {self.engine_index} cannot score now (asleep or mid-push)")
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(map(int, s))} for s in sequences], params, use_tqdm=False)
        scores = []
        for seq, out in zip(sequences, outputs, strict=True):
            # prompt_logprobs[0] is None (no context); entry t maps token ids to Logprob objects.
            scores.append([0.0] + [float(out.prompt_logprobs[t][int(seq[t])].logprob) for t in range(1, len(seq))])
        return scores

    def generate_tagged(self, requests: list[RolloutRequest], sampling: SamplingOptions = SamplingOptions()) -> tuple[int, list[list[SampleResult]]]:
        """`generate`, plus the weights version that produced the samples (for EngineGroup)."""
        return self.weights_version, self.generate(requests, sampling)

    def _to_results(self, index: int, request: RolloutRequest, out) -> list[SampleResult]:
        results = []
        for j, completion in enumerate(sorted(out.outputs, key=lambda c: c.index)):
            token_ids = [int(t) for t in completion.token_ids]
            logprobs = [float(completion.logprobs[k][tok].logprob) for k, tok in enumerate(token_ids)]
            assistant = {"role": "assistant", "content": completion.text}
            results.append(
                SampleResult(
                    prompt_token_ids=[int(t) for t in out.prompt_token_ids],
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason or "abort",
                    stop_reason=completion.stop_reason,
                    text=completion.text,
                    messages=[*(request.messages or []), assistant],
                    request_index=index,
                    sample_index=j,
                    metadata=dict(request.metadata),
                )
            )
        return results

    # ---------------------------------------------------------------- weights
    def begin_weight_update(self) -> int:
        """Start a push; returns the current weights version."""
        self.llm.collective_rpc("megarl_begin_weight_update")
        self.updating = True
        return self.weights_version

    def load_weight_bucket(self, transport: str, payload: Any) -> dict:
        reports = self.llm.collective_rpc("megarl_load_weight_bucket", args=(transport, payload))
        return reports[0]  # every TP worker loads the same bucket; rank 0's report stands for all

    def finish_weight_update(self, version: int | None = None) -> dict:
        """End a push; the engine's weights version becomes `version` (the pusher gives every engine
        the same number) or, if None, the next one."""
        reports = self.llm.collective_rpc("megarl_finish_weight_update")
        self.updating = False
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.weights_version = self.weights_version + 1 if version is None else int(version)
        return {**reports[0], "weights_version": self.weights_version}

    def update_weights(self, named_tensors) -> dict:
        """All weights in one call, by reference (in-process use; remote callers use WeightPusher)."""
        self.begin_weight_update()
        try:
            self.load_weight_bucket("inline", {"tensors": list(named_tensors)})
        finally:
            report = self.finish_weight_update()
        return report

    def weights_checksum(self) -> str:
        checksums = self.llm.collective_rpc("megarl_weights_checksum")
        return checksums[0] if len(set(checksums)) == 1 else "|".join(checksums)

    def num_workers(self) -> int:
        return self.config.tensor_parallel_size

    def join_nccl_weight_group(self, host: str, port: int, first_rank: int, world_size: int, sender_index: int = 0) -> None:
        self.llm.collective_rpc("megarl_join_nccl_weight_group", args=(host, port, first_rank, world_size, sender_index))

    # ---------------------------------------------------------------- memory phases
    def sleep(self, level: int = 1) -> bool:
        """Free weights (level 1: offload to CPU; level 2: discard) and KV cache between rollout
        phases. Returns whether the engine really slept: without `enable_sleep_mode` (and always on
        CPU, where vLLM has no sleep mode) this is a documented no-op returning False."""
        if not self.config.enable_sleep_mode:
            return False
        self.llm.sleep(level=level)
        self.sleeping = True
        return True

    def wake_up(self) -> bool:
        if not self.sleeping:
            return False
        self.llm.wake_up()
        self.sleeping = False
        return True

    # ---------------------------------------------------------------- status
    def health(self) -> EngineHealth:
        return EngineHealth(
            ok=True,
            engine_index=self.engine_index,
            model=self.config.model,
            weights_version=self.weights_version,
            tensor_parallel_size=self.config.tensor_parallel_size,
            sleeping=self.sleeping,
            pid=os.getpid(),
            detail=f"startup {self.startup_s:.1f} s",
        )

    def info(self) -> dict:
        return {"config": asdict(self.config), "startup_s": self.startup_s, "pid": os.getpid()}

    def tokenizer_info(self) -> dict:
        return {"eos_token_id": self.tokenizer.eos_token_id, "vocab_size": len(self.tokenizer)}
