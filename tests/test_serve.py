"""`fusedeploy serve` and `bench-serve` over loopback, for both runtimes, with tiny models; no mocks.

Each server is the real CLI in a subprocess on a free port (`--port 0`; the
port is read from its announce line), talked to with httpx.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from exporters.gguf import export_gguf
from exporters.onnx import export_onnx
from fusedeploy.errors import UserError
from fusedeploy.evaluate import OnnxRuntimeBackend
from fusedeploy.serve.bench import bench_serve

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = ["genai", "gguf"]


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    hf = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("serve")
    return {"genai": export_onnx(hf, out / "tiny-genai"), "gguf": export_gguf(hf, out / "tiny.gguf", "f32")}


def start_server(artifact: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fusedeploy.cli", "serve", str(artifact), "--port", "0",
                             "--ctx", "512", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("serving "):
            url = line.split(" at ")[1].split()[0].removesuffix("/v1")
            return proc, url
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stdout.read()}")


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request, artifacts):
    proc, url = start_server(artifacts[request.param])
    yield request.param, url, proc
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def sse_chunks(response) -> list:
    """The `data:` payloads of a server-sent-event response, [DONE] last."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_and_models(server):
    _, url, _ = server
    assert httpx.get(f"{url}/health").status_code == 200
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"]


def test_completion_and_chat(server):
    _, url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "The tower is", "max_tokens": 6, "min_tokens": 6,
                                                  "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["text"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 5, "min_tokens": 5, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("route,payload", [
    ("completions", {"prompt": "Once upon a time", "max_tokens": 8, "min_tokens": 8, "temperature": 0}),
    ("chat/completions", {"messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 8, "min_tokens": 8,
                          "temperature": 0}),
])
def test_streaming(server, route, payload):
    _, url, _ = server
    with httpx.stream("POST", f"{url}/v1/{route}", json={**payload, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(r)
    assert chunks[-1] == "[DONE]"
    events = chunks[:-1]
    key = "text" if route == "completions" else "content"
    pieces = [c["choices"][0].get(key) or c["choices"][0].get("delta", {}).get(key) for c in events]
    assert sum(1 for p in pieces if p) >= 6  # one chunk per token (a split multi-byte character may merge two)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body", [
    b"{not json",
    json.dumps({"max_tokens": 4}).encode(),                                  # no prompt
    json.dumps({"prompt": "x", "max_tokens": -3}).encode(),                  # negative length
    json.dumps({"prompt": "x", "temperature": "hot"}).encode(),              # wrong type
])
def test_malformed_completion_is_4xx_json(server, body):
    _, url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    payload = r.json()
    assert "error" in payload or "detail" in payload  # ours: OpenAI's {"error"}; llama-cpp-python: FastAPI's {"detail"}


def test_malformed_chat_is_4xx_json(server):
    _, url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "robot", "content": 3}]}, timeout=30)
    assert 400 <= r.status_code < 500
    assert r.json()


def test_client_disconnect_mid_stream_does_not_hurt_the_server(server):
    _, url, proc = server
    for _ in range(2):  # twice: a leaked generation slot would block the second
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "A long story", "max_tokens": 400, "min_tokens": 400, "temperature": 0,
                                "stream": True}) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data:"):
                    got += 1
                if got >= 3:
                    break  # leaving the block closes the connection mid-stream
        assert got >= 3
    assert proc.poll() is None
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Still there?", "max_tokens": 3, "min_tokens": 3,
                                                  "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{url}/health").status_code == 200


def test_genai_server_greedy_matches_the_runtime(artifacts, smol_tokenizer):
    """The served greedy text is og.Generator's greedy continuation, detokenized."""
    proc, url = start_server(artifacts["genai"])
    try:
        prompt = "The tower is 324 metres tall, about the same height as"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 10, "min_tokens": 10,
                                                      "temperature": 0}, timeout=60)
        ids = smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        want = OnnxRuntimeBackend(artifacts["genai"]).generate(ids, 10)
        assert r.json()["choices"][0]["text"] == smol_tokenizer.decode(want, skip_special_tokens=True)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2000}, timeout=30)
        assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "model": "someone-else"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_bench_serve_stops_by_itself_within_its_duration(server):
    _, url, _ = server
    duration = 2.0
    t0 = time.perf_counter()
    result = bench_serve(url, [1, 3], duration, max_tokens=4)
    total = time.perf_counter() - t0
    levels = result["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for lv in levels:
        assert lv["wall_s"] < duration + 1.5  # cut-off in-flight requests and teardown included
        assert lv["errors"] == 0, lv["first_error"]
        assert lv["requests_started"] >= lv["concurrency"]
    assert total < 2 * (duration + 1.5) + 20  # the levels plus one warm-up request
    # Some output arrived (on a loaded 2-core box a level may see none before its time is up).
    served = [lv for lv in levels if lv["output_tokens"]]
    assert served
    for lv in served:
        assert lv["output_tokens_per_s"] == pytest.approx(lv["output_tokens"] / lv["duration_s"])
        assert lv["ttft_s"]["p50"] <= lv["ttft_s"]["p95"] <= lv["ttft_s"]["p99"]


def test_bench_serve_bad_input():
    with pytest.raises(UserError, match="http"):
        bench_serve("localhost:1", [1], 1)
    with pytest.raises(UserError, match="concurrency"):
        bench_serve("http://127.0.0.1:1", [0], 1)
    with pytest.raises(UserError, match="no OpenAI-compatible server"):
        bench_serve("http://127.0.0.1:1", [1], 1)


def test_serve_bad_artifacts(tmp_path, artifacts):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fusedeploy.cli", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    r = run("serve", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and r.stderr.count("error:") + r.stdout.count("error:") == 1
    optimum = tmp_path / "opt"
    optimum.mkdir()
    (optimum / "model.onnx").write_bytes(b"")
    r = run("serve", str(optimum), "--port", "0")
    assert r.returncode == 2 and "re-export" in (r.stdout + r.stderr)
    r = run("bench-serve", "http://127.0.0.1:1", "--concurrency", "1,x")
    assert r.returncode == 2 and "--concurrency" in (r.stdout + r.stderr)
