"""The OpenAI-compatible rollout server on 127.0.0.1, backed by the shared engine: a chat request
with log-probs (equal to HF's), a weight update (by path and by raw safetensors body)."""

import os
import socket
import threading
import time

import pytest

from tests.rollout.reference import checkpoint_state_dict, hf_model_with, hf_token_logprobs, perturbed_state_dict

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server_url(rollout_group, tokenizer):
    import uvicorn

    from megarl.rollout.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(rollout_group, "tiny-moe", tokenizer), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def chat(url, **body):
    import httpx

    body = {"messages": [{"role": "user", "content": "What is 6 * 7?"}], "logprobs": True, "max_tokens": 12, "n": 2, "seed": 9, **body}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def assert_logprobs_match(model, response):
    import torch

    for choice in response["choices"]:
        ids = response["prompt_token_ids"] + choice["token_ids"]
        ref = hf_token_logprobs(model, ids, len(response["prompt_token_ids"]))
        got = torch.tensor([c["logprob"] for c in choice["logprobs"]["content"]])
        assert (got - ref).abs().max() < 1e-4


def test_chat_completion_with_logprobs(server_url, hf_model, tokenizer):
    import httpx

    assert httpx.get(f"{server_url}/health").json()["ok"] is True
    assert httpx.get(f"{server_url}/v1/models").json()["data"][0]["id"] == "tiny-moe"
    response = chat(server_url)
    assert response["object"] == "chat.completion" and len(response["choices"]) == 2
    for choice in response["choices"]:
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
        assert [c["token"] for c in choice["logprobs"]["content"]] == tokenizer.convert_ids_to_tokens(choice["token_ids"])
    assert response["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in response["choices"])
    assert_logprobs_match(hf_model, response)
    bad = httpx.post(f"{server_url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "top_p": 0})
    assert bad.status_code == 400 and "top_p" in bad.text


def test_weight_update_endpoint(server_url, tiny_moe_dir, hf_model, tmp_path):
    import httpx
    from safetensors.torch import save, save_file

    new = perturbed_state_dict(tiny_moe_dir, scale=0.05, seed=3)
    save_file(new, str(tmp_path / "model.safetensors"))
    r = httpx.post(f"{server_url}/v1/weights", json={"path": str(tmp_path)}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["tensors"] == len(new) and len(r.json()["engine_checksums"]) == 1
    assert_logprobs_match(hf_model_with(tiny_moe_dir, new), chat(server_url))

    assert httpx.post(f"{server_url}/v1/weights", json={"path": "/no/such/ckpt"}).status_code == 404
    # Restore the checkpoint through the raw-bytes form of the endpoint.
    blob = save(checkpoint_state_dict(tiny_moe_dir))
    r = httpx.post(f"{server_url}/v1/weights", content=blob, headers={"content-type": "application/octet-stream"}, timeout=300)
    assert r.status_code == 200, r.text
    assert_logprobs_match(hf_model, chat(server_url))


def test_cli_parses_and_defaults_to_loopback():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rollout_server", os.path.join(os.path.dirname(__file__), "../../launch/rollout_server.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--model", "/m", "--num-engines", "2"])
    assert args.host == "127.0.0.1" and args.num_engines == 2 and args.logprobs_mode == "processed_logprobs"
