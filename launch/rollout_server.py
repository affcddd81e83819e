"""Serve vLLM rollout engines (Ray actors) over an OpenAI-compatible HTTP API, with a weight-update
endpoint, for external agents. See megarl/rollout/server.py for the endpoints and
megarl/rollout/README.md ("Server") for curl examples.

    export MEGARL_ROLLOUT_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    python launch/rollout_server.py --model /path/to/hf_checkpoint --num-engines 2 --port 8000 --weights-dir /ckpts

POST /v1/weights needs `Authorization: Bearer <token>`: the token is $MEGARL_ROLLOUT_TOKEN, the first
line of --api-token-file, or (neither given) a fresh one printed at start. {"path": ...} updates read
only inside the --weights-dir directories.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOKEN_ENV = "MEGARL_ROLLOUT_TOKEN"  # = megarl.rollout.server.TOKEN_ENV (not imported: --help stays light)


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
    p.add_argument("--weights-dir", action="append", default=[],
                   help="a directory POST /v1/weights {'path': ...} may read from (repeatable; none: path updates refused)")
    p.add_argument("--api-token-file", default=None, help=f"file whose first line is the token (else ${TOKEN_ENV})")
    p.add_argument("--max-request-mb", type=float, default=16.0, help="JSON request body limit")
    p.add_argument("--max-weights-body-mb", type=float, default=4096.0, help="raw safetensors body limit")
    return p.parse_args(argv)


def api_token(args) -> tuple[str, bool]:
    """(token, generated): from --api-token-file, $MEGARL_ROLLOUT_TOKEN, or a fresh random one."""
    import secrets

    if args.api_token_file:
        with open(args.api_token_file) as f:
            token = f.readline().strip()
        if not token:
            raise SystemExit(f"error: --api-token-file {args.api_token_file} holds no token")
        return token, False
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], False
    return secrets.token_urlsafe(32), True


def main(argv=None) -> None:
    args = parse_args(argv)
    for folder in args.weights_dir:
        if not os.path.isdir(folder):
            raise SystemExit(f"error: --weights-dir {folder} is not a directory")
    token, generated = api_token(args)
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
        api_token=token,
        weight_dirs=args.weights_dir,
        model_dir=args.model,
        max_body_bytes=int(args.max_request_mb * 2**20),
        max_weights_body_bytes=int(args.max_weights_body_mb * 2**20),
    )
    if generated:
        print(f"rollout server token (POST /v1/weights needs 'Authorization: Bearer <token>'): {token}", flush=True)
    print(f"weight updates by path read only from: {args.weights_dir or 'nowhere (no --weights-dir)'}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        group.shutdown()


if __name__ == "__main__":
    main()
