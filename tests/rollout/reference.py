"""HF transformers as the reference for vLLM's log-probs."""

import torch


@torch.no_grad()
def hf_token_logprobs(model, token_ids: list[int], start: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(token_ids[t] | token_ids[:t]) for t in [start, len): `[len - start]`, nats, fp32."""
    logits = model(torch.tensor([token_ids])).logits[0].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(start - 1, len(token_ids) - 1)
    return logprobs[positions, torch.tensor(token_ids[start:])]


def max_logprob_error(model, samples, temperature: float = 1.0) -> float:
    worst = 0.0
    for s in samples:
        ref = hf_token_logprobs(model, s.prompt_token_ids + s.token_ids, len(s.prompt_token_ids), temperature)
        worst = max(worst, (torch.tensor(s.logprobs) - ref).abs().max().item())
    return worst


def perturbed_state_dict(model_dir: str, scale: float = 0.05, seed: int = 1) -> dict:
    """The checkpoint's tensors (HF names as on disk) plus seeded Gaussian noise."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    sd = load_file(f"{model_dir}/model.safetensors")
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in sorted(sd.items())}


def checkpoint_state_dict(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return dict(sorted(load_file(f"{model_dir}/model.safetensors").items()))


def hf_model_with(model_dir: str, state_dict: dict):
    """An HF model of `model_dir`'s architecture holding `state_dict` (on-disk names). transformers 5
    keeps experts fused in memory, so the weights go through a checkpoint file, not load_state_dict."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    tmp = tempfile.mkdtemp(dir=os.environ.get("TMPDIR"))
    try:
        for f in os.listdir(model_dir):
            if f != "model.safetensors":
                shutil.copy(os.path.join(model_dir, f), tmp)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(tmp, "model.safetensors"))
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    finally:
        shutil.rmtree(tmp)
