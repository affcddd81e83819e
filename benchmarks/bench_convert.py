"""Checkpoint conversion throughput and memory: HF -> megarl checkpoint -> HF on a random Qwen3-MoE,
against a raw write of the same bytes to the same disk, measured in one run.

    python benchmarks/bench_convert.py [--hidden 1024 --layers 8 --experts 16 --moe-intermediate 512]
                                       [--max-shard-size 100MB] [--work-dir DIR] [--keep]

Writes the model with megarl.utils.tiny_models.write_tiny_model (default ≈ 227M parameters, fp32
≈ 0.91 GB), then runs each conversion in a fresh child process and reports, per direction:
GB/s (weight bytes / wall time of the conversion call, imports excluded), and the child's peak RSS
(from wait4) next to the RSS of a child that only imports the same modules. mcore-to-hf streams, so
its peak should be about baseline + one output shard + the largest tensor; hf-to-mcore builds the
model once (peak about baseline + model). The raw write is the same number of bytes written in
shard-sized files with plain buffered writes (no fsync, like the conversion).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD_IMPORTS = "import megarl.checkpoint.convert, mbridge, megatron.core.dist_checkpointing, transformers"

CHILD_CODE = {
    "baseline": CHILD_IMPORTS + "\nprint(json.dumps({}))",
    "hf_to_mcore": CHILD_IMPORTS + """
from megarl.checkpoint.convert import hf_to_mcore
start = time.perf_counter()
step = hf_to_mcore(ARGS["hf"], ARGS["mcore"])
print(json.dumps({"seconds": time.perf_counter() - start, "step": step}))
""",
    "mcore_to_hf": CHILD_IMPORTS + """
from megarl.checkpoint.convert import McoreToHfOptions, mcore_to_hf
result = mcore_to_hf(ARGS["mcore"], ARGS["out"], McoreToHfOptions(max_shard_size=ARGS["shard"], progress=False))
print(json.dumps({"seconds": result.seconds, "bytes": result.bytes, "files": len(result.files)}))
""",
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--max-shard-size", default="100MB")
    p.add_argument("--work-dir", default=None, help="default: a fresh folder under $TMPDIR (removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    return p.parse_args()


def run_measured(kind: str, args: dict) -> tuple[dict, float]:
    """Run one phase in a fresh interpreter, inside a fork whose only child it is (so ru_maxrss of
    RUSAGE_CHILDREN is that phase alone). Returns (its JSON result line, its peak RSS in GiB)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read_fd)
        try:
            code = "import json, time\nARGS = " + repr(args) + "\n" + CHILD_CODE[kind]
            env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            import resource

            peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            payload = {"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr[-3000:], "peak_kib": peak_kib}
        except Exception as err:  # noqa: BLE001 - report anything to the parent
            payload = {"rc": 1, "stdout": "", "stderr": repr(err), "peak_kib": 0}
        with os.fdopen(write_fd, "w") as f:
            json.dump(payload, f)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        payload = json.load(f)
    os.waitpid(pid, 0)
    if payload["rc"] != 0:
        raise RuntimeError(f"{kind} failed:\n{payload['stderr']}")
    return json.loads(payload["stdout"].strip().splitlines()[-1]), payload["peak_kib"] / 2**20


def raw_write_gbps(folder: str, total_bytes: int, shard_bytes: int) -> float:
    """Write `total_bytes` of random data in files of `shard_bytes` (plain buffered writes)."""
    import torch

    block = torch.randint(0, 256, (min(shard_bytes, 64 * 2**20),), dtype=torch.uint8).numpy().tobytes()
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    written, index = 0, 0
    while written < total_bytes:
        with open(os.path.join(folder, f"raw-{index:05d}.bin"), "wb") as f:
            in_file = 0
            while in_file < shard_bytes and written < total_bytes:
                n = min(len(block), shard_bytes - in_file, total_bytes - written)
                f.write(block[:n])
                in_file += n
                written += n
        index += 1
    return total_bytes / 1e9 / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    from megarl.checkpoint.convert_safetensors import parse_size
    from megarl.utils.tiny_models import TinyModelSpec, write_tiny_model

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_convert_", dir=os.environ.get("TMPDIR"))
    hf_dir, mcore_dir, out_dir, raw_dir = (os.path.join(work, n) for n in ("hf", "mcore", "hf_back", "raw"))
    for folder in (mcore_dir, out_dir, raw_dir):
        shutil.rmtree(folder, ignore_errors=True)
    spec = TinyModelSpec(hidden_size=args.hidden, num_layers=args.layers, num_experts=args.experts,
                         moe_intermediate_size=args.moe_intermediate, num_heads=16, num_kv_heads=4, head_dim=64,
                         init_std=0.02)
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        write_tiny_model(hf_dir, spec)
    model_bytes = os.path.getsize(os.path.join(hf_dir, "model.safetensors"))
    print(f"model: {spec}\n  {model_bytes / 1e9:.3f} GB fp32 (~{model_bytes / 4 / 1e6:.0f}M parameters) in {hf_dir}")

    _, baseline_gb = run_measured("baseline", {})
    to_mcore, to_mcore_gb = run_measured("hf_to_mcore", {"hf": hf_dir, "mcore": mcore_dir})
    to_hf, to_hf_gb = run_measured("mcore_to_hf", {"mcore": mcore_dir, "out": out_dir, "shard": args.max_shard_size})
    raw = raw_write_gbps(raw_dir, to_hf["bytes"], parse_size(args.max_shard_size))

    print(f"raw write of the same bytes ({to_hf['bytes'] / 1e9:.3f} GB, {args.max_shard_size} files): {raw:.3f} GB/s")
    print(f"hf-to-mcore: {to_hf['bytes'] / 1e9 / to_mcore['seconds']:.3f} GB/s ({to_mcore['seconds']:.1f} s), "
          f"peak RSS {to_mcore_gb:.2f} GB")
    print(f"mcore-to-hf: {to_hf['bytes'] / 1e9 / to_hf['seconds']:.3f} GB/s ({to_hf['seconds']:.1f} s, "
          f"{to_hf['files']} shards of <= {args.max_shard_size}), peak RSS {to_hf_gb:.2f} GB "
          f"= {(to_hf['bytes'] / 1e9 / to_hf['seconds']) / raw:.2f} x raw write")
    print(f"baseline RSS (imports only): {baseline_gb:.2f} GB; mcore-to-hf above baseline "
          f"{to_hf_gb - baseline_gb:.2f} GB for a {model_bytes / 1e9:.2f} GB model")
    if not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
