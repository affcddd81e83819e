"""The OpenAI-compatible rollout server on 127.0.0.1, backed by the shared engine, spoken to with real
HTTP clients (httpx, and curl for the README's examples): chat with log-probs (equal to HF's), weight
updates by path and by raw body, the token, the allowed directories, staging (a bad file leaves the
old weights and version in place) and the body limits."""

import os
import re
import shlex
import socket
import subprocess
import threading
import time

import pytest

from tests.rollout.reference import checkpoint_state_dict, hf_model_with, hf_token_logprobs, perturbed_state_dict

pytestmark = pytest.mark.vllm

TOKEN = "test-token-7f3a"
MAX_BODY = 64 * 1024
MAX_WEIGHTS_BODY = 2 * 2**20  # the tiny model's file is 0.66 MB
README = os.path.join(os.path.dirname(__file__), "../../megarl/rollout/README.md")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, tiny_moe_dir):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("allowed_weights")
    os.makedirs(root / "step_10")
    save_file(checkpoint_state_dict(tiny_moe_dir), str(root / "step_10" / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def server_url(rollout_group, tokenizer, tiny_moe_dir, weights_dir):
    import uvicorn

    from megarl.rollout.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(rollout_group, "tiny-moe", tokenizer, api_token=TOKEN, weight_dirs=[str(weights_dir)],
                     model_dir=tiny_moe_dir, max_body_bytes=MAX_BODY, max_weights_body_bytes=MAX_WEIGHTS_BODY)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


AUTH = {"authorization": f"Bearer {TOKEN}"}


def chat(url, **body):
    import httpx

    body = {"messages": [{"role": "user", "content": "What is 6 * 7?"}], "logprobs": True, "max_tokens": 12, "n": 2, "seed": 9, **body}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def weights_version(url) -> int:
    import httpx

    return httpx.get(f"{url}/health", timeout=60).json()["engines"][0]["weights_version"]


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


def test_weight_update_endpoint(server_url, tiny_moe_dir, hf_model, weights_dir):
    import httpx
    from safetensors.torch import save, save_file

    new = perturbed_state_dict(tiny_moe_dir, scale=0.05, seed=3)
    os.makedirs(weights_dir / "perturbed", exist_ok=True)
    save_file(new, str(weights_dir / "perturbed" / "model.safetensors"))
    before = weights_version(server_url)
    r = httpx.post(f"{server_url}/v1/weights", json={"path": str(weights_dir / "perturbed")}, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["tensors"] == len(new) and len(r.json()["engine_checksums"]) == 1
    assert r.json()["weights_version"] == before + 1 == weights_version(server_url)
    assert_logprobs_match(hf_model_with(tiny_moe_dir, new), chat(server_url))

    missing = httpx.post(f"{server_url}/v1/weights", json={"path": str(weights_dir / "no_such_step")}, headers=AUTH)
    assert missing.status_code == 404  # inside the allowed directory the caller may learn what is there
    # Restore the checkpoint through the raw-bytes form of the endpoint.
    blob = save(checkpoint_state_dict(tiny_moe_dir))
    r = httpx.post(f"{server_url}/v1/weights", content=blob, headers={**AUTH, "content-type": "application/octet-stream"}, timeout=300)
    assert r.status_code == 200, r.text
    assert_logprobs_match(hf_model, chat(server_url))


def test_weights_need_the_token(server_url, weights_dir):
    import httpx

    body = {"path": str(weights_dir / "step_10")}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}, {"authorization": f"Basic {TOKEN}"}):
        r = httpx.post(f"{server_url}/v1/weights", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
        assert "Authorization: Bearer" in r.json()["detail"]
    raw = httpx.post(f"{server_url}/v1/weights", content=b"x" * 100, headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 401


def test_paths_outside_the_allowed_directories_are_refused_alike(server_url, tiny_moe_dir, weights_dir, tmp_path):
    import httpx

    os.symlink(tiny_moe_dir, weights_dir / "link_out")  # inside by name, outside once resolved
    answers = []
    for path in [os.path.join(tiny_moe_dir, "model.safetensors"), tiny_moe_dir, "/no/such/ckpt", "/etc/passwd",
                 str(weights_dir / ".." / "elsewhere"), str(weights_dir / "link_out"), str(tmp_path)]:
        r = httpx.post(f"{server_url}/v1/weights", json={"path": path}, headers=AUTH)
        answers.append((r.status_code, r.json()))
    assert answers == [(403, {"detail": "path is outside the server's allowed weight directories"})] * len(answers)


def test_a_bad_file_leaves_the_old_weights_and_version(server_url, hf_model, tiny_moe_dir, weights_dir):
    import httpx
    import torch
    from safetensors.torch import save, save_file

    reference = chat(server_url)
    version = weights_version(server_url)
    good = checkpoint_state_dict(tiny_moe_dir)
    os.makedirs(weights_dir / "bad", exist_ok=True)
    corrupt = bytearray(save(perturbed_state_dict(tiny_moe_dir, scale=0.5, seed=5)))
    (weights_dir / "bad" / "truncated.safetensors").write_bytes(bytes(corrupt[: len(corrupt) // 2]))
    (weights_dir / "bad" / "garbage.safetensors").write_bytes(b"\xff" * 64 + bytes(corrupt[64:]))
    name = next(iter(good))
    save_file({name: torch.zeros(3, 3)}, str(weights_dir / "bad" / "wrong_shape.safetensors"))
    save_file({"model.no_such.weight": torch.zeros(2)}, str(weights_dir / "bad" / "unknown.safetensors"))
    # a folder whose first file is good and second corrupt: nothing may reach the engine
    os.makedirs(weights_dir / "half", exist_ok=True)
    save_file(perturbed_state_dict(tiny_moe_dir, scale=0.5, seed=6), str(weights_dir / "half" / "a.safetensors"))
    (weights_dir / "half" / "b.safetensors").write_bytes(bytes(corrupt[: len(corrupt) // 3]))

    cases = {"bad/truncated.safetensors": "not a readable safetensors file", "bad/garbage.safetensors": "not a readable safetensors file",
             "bad/wrong_shape.safetensors": "wrong shapes", "bad/unknown.safetensors": "1 unknown names", "half": "b.safetensors is not a readable"}
    for rel, message in cases.items():
        r = httpx.post(f"{server_url}/v1/weights", json={"path": str(weights_dir / rel)}, headers=AUTH, timeout=300)
        assert r.status_code == 400 and message in r.json()["detail"], (rel, r.text)
    r = httpx.post(f"{server_url}/v1/weights", content=bytes(corrupt[:1000]), headers={**AUTH, "content-type": "application/octet-stream"})
    assert r.status_code == 400 and "body is not a safetensors file" in r.json()["detail"]

    assert weights_version(server_url) == version
    again = chat(server_url)  # same seed, same weights: the same tokens and log-probs
    assert [c["token_ids"] for c in again["choices"]] == [c["token_ids"] for c in reference["choices"]]
    assert [[t["logprob"] for t in c["logprobs"]["content"]] for c in again["choices"]] == \
           [[t["logprob"] for t in c["logprobs"]["content"]] for c in reference["choices"]]
    assert_logprobs_match(hf_model, again)


def test_bodies_over_the_limit_get_413(server_url):
    import httpx

    big_chat = {"messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    r = httpx.post(f"{server_url}/v1/chat/completions", json=big_chat)
    assert r.status_code == 413 and f"limit of {MAX_BODY} bytes" in r.json()["detail"]

    def chunks():  # no content-length (chunked): the limit must hold while reading the stream too
        for _ in range(MAX_WEIGHTS_BODY // 65536):
            yield b"\0" * 65536
        yield b"\0"  # one byte over

    r = httpx.post(f"{server_url}/v1/weights", content=chunks(), headers={**AUTH, "content-type": "application/octet-stream"})
    assert r.status_code == 413 and f"limit of {MAX_WEIGHTS_BODY} bytes" in r.json()["detail"]


def readme_curl_lines() -> list[str]:
    text = open(README).read()
    block = re.search(r"## Server\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("curl ")]


def test_readme_curl_examples_return_200(server_url, weights_dir, hf_model):
    lines = readme_curl_lines()
    assert len(lines) == 4 and any("/v1/chat/completions" in line for line in lines)
    port = server_url.rsplit(":", 1)[1]
    env = {**os.environ, "MEGARL_ROLLOUT_TOKEN": TOKEN}
    for line in lines:
        command = line.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("/ckpts", str(weights_dir))
        out = subprocess.run(["bash", "-c", command + " -o /dev/stderr -w '%{http_code}' --max-time 300"],
                             env=env, capture_output=True, text=True, timeout=320)
        assert out.stdout == "200", (shlex.split(line)[2], out.stdout, out.stderr[-2000:])
    # the pushes were the checkpoint's own weights: the engine serves what it served before
    assert_logprobs_match(hf_model, chat(server_url))


def test_cli_parses_and_defaults_to_loopback(monkeypatch, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("rollout_server", os.path.join(os.path.dirname(__file__), "../../launch/rollout_server.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--model", "/m", "--num-engines", "2", "--weights-dir", "/a", "--weights-dir", "/b"])
    assert args.host == "127.0.0.1" and args.num_engines == 2 and args.logprobs_mode == "processed_logprobs"
    assert args.weights_dir == ["/a", "/b"]
    monkeypatch.delenv("MEGARL_ROLLOUT_TOKEN", raising=False)
    token, generated = module.api_token(args)
    assert generated and len(token) >= 40 and module.api_token(args)[0] != token
    monkeypatch.setenv("MEGARL_ROLLOUT_TOKEN", "from-env")
    assert module.api_token(args) == ("from-env", False)
    (tmp_path / "tok").write_text("from-file\n")
    assert module.api_token(module.parse_args(["--model", "/m", "--api-token-file", str(tmp_path / "tok")])) == ("from-file", False)
