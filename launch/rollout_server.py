"""Serve vLLM rollout engines (Ray actors) over an OpenAI-compatible HTTP API, with a weight-update
endpoint, for external agents. See megarl/rollout/server.py for the endpoints.

    python launch/rollout_server.py --model /path/to/hf_checkpoint --num-engines 2 --port 8000
    curl -s 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}], "logprobs": true}'
    curl -s 127.0.0.1:8000/v1/weights -H 'content-type: application/json' -d '{"path": "/ckpt/step_10"}'
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF checkpoint folder")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-engines", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--logprobs-mode", default="processed_logprobs", choices=["processed_logprobs", "raw_logprobs"])
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--engine-cpus", type=float, default=1.0, help="CPUs reserved per engine bundle")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--bucket-mb", type=float, default=512.0, help="weight push bucket size")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import uvicorn
    from transformers import AutoTokenizer

    from megarl.rollout import EngineGroup, EngineGroupOptions, VLLMEngineConfig, init_ray
    from megarl.rollout.server import create_app
    from megarl.rollout.weight_sync import WeightPushOptions

    config = VLLMEngineConfig(
        model=args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        logprobs_mode=args.logprobs_mode,
        enforce_eager=args.enforce_eager,
    )
    init_ray(address=args.ray_address)
    group = EngineGroup(config, EngineGroupOptions(num_engines=args.num_engines, engine_cpus=args.engine_cpus))
    app = create_app(
        group,
        args.served_model_name or os.path.basename(os.path.normpath(args.model)),
        AutoTokenizer.from_pretrained(args.model),
        WeightPushOptions(bucket_mb=args.bucket_mb, verify="checksum"),
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        group.shutdown()


if __name__ == "__main__":
    main()
