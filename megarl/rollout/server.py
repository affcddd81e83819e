"""OpenAI-compatible HTTP front for an EngineGroup, for external agents (`launch/rollout_server.py`).

Endpoints:
- POST /v1/chat/completions  OpenAI chat request (messages, n, temperature, top_p, top_k,
  max_tokens | max_completion_tokens, stop, seed, logprobs). Each choice also carries the RL fields
  `token_ids` (generated ids) and the response `prompt_token_ids`, so an agent can hand exact tokens
  and rollout log-probs back to the trainer. `logprobs.content[i].logprob` follows the engines'
  `logprobs_mode` (see vllm_engine.py); only the sampled token's log-prob is available
  (`top_logprobs` > 0 is refused).
- POST /v1/weights  a weight update: either JSON {"path": file.safetensors | folder of *.safetensors}
  or a raw safetensors body (Content-Type application/octet-stream). Pushed to every engine over the
  object store; generation waits while a push runs (and vice versa).
- GET /health, GET /v1/models.
"""


import glob
import os
import threading
import time
import uuid
from contextlib import contextmanager

from megarl.rollout.types import RolloutRequest, SamplingOptions


class ReadWriteLock:
    """Many generate calls at once, or one weight push alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def sampling_from_openai(body: dict) -> SamplingOptions:
    """OpenAI request fields → SamplingOptions (absent or null fields take the defaults)."""

    def get(key, default):
        value = body.get(key)
        return default if value is None else value

    stop = get("stop", ())
    return SamplingOptions(
        n=int(get("n", 1)),
        temperature=float(get("temperature", 1.0)),
        top_p=float(get("top_p", 1.0)),
        top_k=int(get("top_k", 0)),
        max_tokens=int(get("max_completion_tokens", get("max_tokens", 256))),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        seed=body.get("seed"),
    )


def load_safetensors_source(path: str):
    """(name, tensor) pairs from a .safetensors file or every *.safetensors in a folder."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"no safetensors weights at {path!r}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def create_app(group, model_name: str, tokenizer, push_options=None):
    from fastapi import FastAPI, HTTPException, Request

    from megarl.rollout.weight_sync import WeightPushOptions

    app = FastAPI(title="megarl rollout server")
    lock = ReadWriteLock()
    push_options = push_options or WeightPushOptions(verify="checksum")

    @app.get("/health")
    def health():
        engines = group.health()
        return {"ok": all(h.ok for h in engines), "engines": [vars(h) for h in engines]}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "megarl"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        if body.get("stream"):
            raise HTTPException(400, "stream=true is not supported by the megarl rollout server")
        if int(body.get("top_logprobs") or 0) > 0:
            raise HTTPException(400, "top_logprobs > 0 is not supported; logprobs=true gives the sampled token's log-prob")
        if not body.get("messages"):
            raise HTTPException(400, "messages is required")
        try:
            sampling = sampling_from_openai(body)
            request = RolloutRequest(messages=body["messages"])
        except (ValueError, TypeError) as e:
            raise HTTPException(400, str(e)) from e
        with lock.read():
            samples = group.generate([request], sampling)[0]
        want_logprobs = bool(body.get("logprobs"))
        choices = []
        for s in samples:
            choice = {
                "index": s.sample_index,
                "message": {"role": "assistant", "content": s.text},
                "finish_reason": s.finish_reason,
                "logprobs": None,
                "token_ids": s.token_ids,
            }
            if want_logprobs:
                tokens = tokenizer.convert_ids_to_tokens(s.token_ids)
                choice["logprobs"] = {
                    "content": [
                        {"token": tok, "logprob": lp, "bytes": None, "top_logprobs": []}
                        for tok, lp in zip(tokens, s.logprobs, strict=True)
                    ]
                }
            choices.append(choice)
        prompt_len = len(samples[0].prompt_token_ids)
        completion = sum(len(s.token_ids) for s in samples)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "prompt_token_ids": samples[0].prompt_token_ids,
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion},
        }

    @app.post("/v1/weights")
    async def update_weights(request: Request):
        import asyncio

        if request.headers.get("content-type", "").startswith("application/octet-stream"):
            from safetensors.torch import load

            blob = await request.body()
            try:
                named = list(load(blob).items())
            except Exception as e:  # noqa: BLE001 - any parse error is the client's
                raise HTTPException(400, f"body is not a safetensors file: {e}") from e
        else:
            body = await request.json()
            if "path" not in body:
                raise HTTPException(400, 'send {"path": ...} or a safetensors body (application/octet-stream)')
            if not os.path.exists(body["path"]):
                raise HTTPException(404, f"no such path: {body['path']}")
            named = load_safetensors_source(body["path"])

        def push():
            with lock.write():
                return group.push_weights(named, push_options)

        stats = await asyncio.get_running_loop().run_in_executor(None, push)
        return {
            "weights_version": stats.weights_version,
            "tensors": stats.tensors,
            "bytes": stats.bytes,
            "seconds": stats.seconds,
            "engine_checksums": stats.engine_checksums,
        }

    return app
