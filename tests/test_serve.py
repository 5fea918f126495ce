"""`fusedeploy serve` and `bench-serve` over loopback, for both runtimes, with tiny models; no mocks.

Each server is the real CLI in a subprocess on a free port (`--port 0`; the
port is read from its announce line), talked to with the official `openai`
SDK (what users run) and, for malformed requests the SDK cannot send, httpx.
The GGUF side needs llama.cpp's llama-server (`make setup` builds it); where
it is not built those tests skip, saying so.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from exporters.gguf import export_gguf
from exporters.llama_server import find_server
from exporters.onnx import export_onnx
from fusedeploy.errors import UserError
from fusedeploy.evaluate import OnnxRuntimeBackend
from fusedeploy.formats import TOLERANCES
from fusedeploy.serve.bench import bench_serve

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = ["genai", "gguf"]
KEY = "test-key"
PARALLEL = 4
NO_LLAMA_SERVER = "llama.cpp's llama-server is not built (run `make setup` or `python -m exporters.llama_server`)"


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    hf = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("serve")
    return {"hf": hf, "genai": export_onnx(hf, out / "tiny-genai"), "gguf": export_gguf(hf, out / "tiny.gguf", "f32")}


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


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request, artifacts):
    if request.param == "gguf" and find_server() is None:
        pytest.skip(NO_LLAMA_SERVER)
    proc, url = start_server(artifacts[request.param], "--api-key", KEY, "--parallel", str(PARALLEL))
    yield request.param, url, proc
    stop_server(proc)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


AUTH = {"Authorization": f"Bearer {KEY}"}
EXACT = {"ignore_eos": True}  # generate exactly max_tokens (a random model may pick end-of-sequence early)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


# ---------------------------------------------------------------- the OpenAI routes

def test_health_models_and_metrics(server):
    _, url, _ = server
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed: a load balancer's probe
    models = client(url).models.list()
    assert [m.id for m in models.data] and models.data[0].object == "model"
    r = httpx.get(f"{url}/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for series in ("fusedeploy_requests_total", "fusedeploy_prompt_tokens_total", "fusedeploy_generation_tokens_total",
                   "fusedeploy_requests_waiting", "fusedeploy_time_to_first_token_seconds_bucket",
                   "fusedeploy_inter_token_latency_seconds_bucket"):
        assert series in r.text


def test_completion_and_chat_lengths(server):
    _, url, _ = server
    c = client(url)
    r = c.completions.create(model="", prompt="The tower is", max_tokens=6, temperature=0, extra_body=EXACT)
    assert r.object == "text_completion" and r.usage.completion_tokens == 6 and r.choices[0].text
    r = c.chat.completions.create(model=c.models.list().data[0].id, messages=[{"role": "user", "content": "Hi"}],
                                  max_completion_tokens=5, temperature=0, extra_body=EXACT)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 5
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]
    r = c.chat.completions.create(model="", messages=[{"role": "user", "content": parts}], max_tokens=4,
                                  temperature=0, extra_body=EXACT)
    assert r.usage.completion_tokens == 4
    r2 = c.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi there"}], max_tokens=4,
                                   temperature=0, extra_body=EXACT)
    assert r2.choices[0].message.content == r.choices[0].message.content  # parts join into the same prompt


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_with_and_without_usage(server, chat):
    _, url, _ = server
    c = client(url)

    def stream(**extra):
        if chat:
            return list(c.chat.completions.create(model="", messages=[{"role": "user", "content": "Tell me"}],
                                                  max_tokens=7, temperature=0, stream=True, extra_body=EXACT, **extra))
        return list(c.completions.create(model="", prompt="Once upon a time", max_tokens=7, temperature=0,
                                         stream=True, extra_body=EXACT, **extra))

    chunks = stream(stream_options={"include_usage": True})
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    assert not chunks[-1].choices
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    chunks = stream()
    assert all(getattr(ch, "usage", None) is None for ch in chunks)


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats(server, chat):
    """vLLM's stream_options.continuous_usage_stats (guidellm sends it): the chunks that carry tokens also carry
    the usage so far, the prompt's tokens and the tokens generated until then."""
    _, url, _ = server
    c = client(url)
    options = {"include_usage": True, "continuous_usage_stats": True}
    if chat:
        stream = c.chat.completions.create(model="", messages=[{"role": "user", "content": "Tell me"}], max_tokens=7,
                                           temperature=0, stream=True, stream_options=options, extra_body=EXACT)
    else:
        stream = c.completions.create(model="", prompt="Once upon a time", max_tokens=7, temperature=0, stream=True,
                                      stream_options=options, extra_body=EXACT)
    chunks = list(stream)
    final = chunks[-1].usage
    assert not chunks[-1].choices and final.completion_tokens == 7 and final.prompt_tokens > 0
    counts = []
    for ch in chunks[:-1]:
        if ch.choices and (ch.choices[0].delta.content if chat else ch.choices[0].text):
            assert ch.usage is not None and ch.usage.prompt_tokens == final.prompt_tokens
            assert ch.usage.total_tokens == ch.usage.prompt_tokens + ch.usage.completion_tokens
            counts.append(ch.usage.completion_tokens)
    assert counts and counts == sorted(counts) and 1 <= counts[0] and counts[-1] <= 7


def _greedy_pieces(c: openai.OpenAI, prompt: str, n: int) -> list[str]:
    out = []
    for ch in c.completions.create(model="", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                   extra_body=EXACT):
        if ch.choices and ch.choices[0].text:
            out.append(ch.choices[0].text)
    return out


def test_stop_string_spanning_two_tokens_never_leaks(server):
    _, url, _ = server
    c = client(url)
    prompt = "The history of the printing press"
    pieces = _greedy_pieces(c, prompt, 16)
    text = "".join(pieces)
    stop, where = None, 0
    for i in range(1, len(pieces)):
        where += len(pieces[i - 1])
        if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2:
            candidate = pieces[i - 1][-2:] + pieces[i][:2]
            if text.find(candidate) == where - 2:
                stop = candidate
                break
    assert stop, f"no two-token stop string to test in {pieces}"
    want = text[:text.index(stop)]
    r = c.completions.create(model="", prompt=prompt, max_tokens=16, temperature=0, stop=[stop], extra_body=EXACT)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="", prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True, extra_body=EXACT)
        if ch.choices)
    assert streamed == want and stop not in streamed


def test_n_choices(server):
    runtime, url, _ = server
    c = client(url)
    r = c.completions.create(model="", prompt="Hello", n=2, max_tokens=3, temperature=0, extra_body=EXACT)
    assert sorted(ch.index for ch in r.choices) == [0, 1] and r.usage.completion_tokens == 6
    assert r.choices[0].text == r.choices[1].text  # greedy: the same continuation twice
    chunks = list(c.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], n=2,
                                            max_tokens=3, temperature=0.8, stream=True,
                                            stream_options={"include_usage": True}, extra_body=EXACT))
    assert chunks[-1].usage.completion_tokens == 6
    finishes = sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    assert finishes == [0, 1]
    if runtime == "gguf":  # llama-server: one slot per choice
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model="", prompt="Hello", n=PARALLEL + 1, max_tokens=3)
        assert err.value.status_code == 400 and err.value.body["param"] == "n"


@pytest.mark.parametrize("field,value", [("logit_bias", {"1": 5}), ("suffix", "!"), ("best_of", 2)])
def test_an_unsupported_field_is_a_400_naming_it(server, field, value):
    _, url, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        client(url).completions.create(model="", prompt="Hello", max_tokens=2, **{field: value})
    assert err.value.body["param"] == field and field in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                            tools=[{"type": "function", "function": {"name": "f"}}])
    assert err.value.body["param"] == "tools"


def test_api_key_is_enforced(server):
    _, url, _ = server
    with pytest.raises(openai.AuthenticationError) as err:
        client(url, key="wrong").completions.create(model="", prompt="Hi", max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    for method, route in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                          ("GET", "/metrics")):
        r = httpx.request(method, f"{url}{route}", json={"prompt": "Hi"}, timeout=10)
        assert r.status_code == 401 and "error" in r.json(), (route, r.text)


def test_concurrent_streams_all_complete(server):
    _, url, _ = server
    streams, tokens = 12, 8

    async def one(c: openai.AsyncOpenAI, i: int) -> int:
        stream = await c.completions.create(model="", prompt=f"Request number {i} says", max_tokens=tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body=EXACT)
        usage = None
        async for ch in stream:
            usage = ch.usage or usage
        return usage.completion_tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(streams)))

    assert asyncio.run(main()) == [tokens] * streams


def test_a_client_that_disconnects_frees_its_slot(server):
    runtime, url, proc = server
    c = client(url)
    generated = "llamacpp:tokens_predicted_total" if runtime == "gguf" else "fusedeploy_generation_tokens_total"
    long_answer = {"prompt": "Another long story", "max_tokens": 450, "ignore_eos": True}
    # How long a whole long answer takes on this machine (a slot's context may end it before 450 tokens):
    # the clients below give up at a tenth of that, so they leave while it is still being generated
    # however fast or slow the box is.
    t0 = time.perf_counter()
    httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=120, json=long_answer).raise_for_status()
    give_up = (time.perf_counter() - t0) / 10
    before = metric(url, generated)
    for _ in range(PARALLEL):  # as many long generations as there are slots, each dropped after 3 tokens
        stream = c.completions.create(model="", prompt="A long story", max_tokens=450, temperature=0, stream=True,
                                      extra_body=EXACT)
        got = 0
        for ch in stream:
            got += 1
            if got >= 3:
                break
        stream.close()  # closes the connection mid-stream
    for _ in range(2):  # not streamed: the client gives up waiting (a read timeout closes the connection)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=httpx.Timeout(30, read=give_up),
                       json=long_answer)
    # Generation stops (far fewer tokens than the 6 x 450 asked for) and the slots go idle; the bound is
    # generous for a loaded 2-core box.
    deadline = time.monotonic() + 30
    while metric(url, "fusedeploy_requests_running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(url, "fusedeploy_requests_running") == 0
    assert metric(url, generated) - before < 1000
    assert proc.poll() is None
    # Every slot is free again: as many short requests as slots, at once, finish (leaked slots would keep
    # generating 450 tokens each first).
    async def short():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60) as ac:
            return await asyncio.gather(*(ac.completions.create(model="", prompt="Still there?", max_tokens=3,
                                                                temperature=0, extra_body=EXACT)
                                          for _ in range(PARALLEL)))

    t0 = time.perf_counter()
    done = asyncio.run(short())
    assert [r.usage.completion_tokens for r in done] == [3] * PARALLEL
    assert time.perf_counter() - t0 < 30


MALFORMED = [
    ("POST", "/v1/completions", b"{not json"),
    ("POST", "/v1/completions", b"[1, 2]"),
    ("POST", "/v1/completions", json.dumps({"max_tokens": 4}).encode()),                        # no prompt
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": -3}).encode()),        # negative length
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "temperature": "hot"}).encode()),    # wrong type
    ("POST", "/v1/completions", json.dumps({"prompt": ""}).encode()),                           # empty prompt
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "stop": [""]}).encode()),            # empty stop
    ("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": 3}]}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"messages": []}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                                 "max_completion_tokens": 0}).encode()),
    ("GET", "/v1/completions", b""),
    ("POST", "/v1/models", b"{}"),
    ("GET", "/v1/nowhere", b""),
    ("POST", "/health", b"{}"),
]


@pytest.mark.parametrize("method,route,body", MALFORMED)
def test_malformed_requests_are_4xx_with_openai_bodies(server, method, route, body):
    _, url, _ = server
    r = httpx.request(method, f"{url}{route}", content=body, timeout=30,
                      headers={**AUTH, "content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    payload = r.json()
    assert set(payload) == {"error"} and payload["error"]["message"] and payload["error"]["type"], payload


def test_a_chat_prompt_longer_than_the_context_is_a_400(server):
    _, url, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model="", messages=[{"role": "user", "content": "word " * 1200}])
    assert err.value.status_code == 400 and "context" in err.value.body["message"]


# ---------------------------------------------------------------- runtime specifics

def test_genai_greedy_and_logprobs_match_the_references(server, artifacts, smol_tokenizer):
    """Served greedy text is og's greedy continuation; echoed prompt logprobs match PyTorch (verify's fp32 tolerance)."""
    runtime, url, _ = server
    if runtime != "genai":
        pytest.skip("og.Engine specifics")
    import torch
    from transformers import AutoModelForCausalLM

    c = client(url)
    prompt = "The tower is 324 metres tall, about the same height as"
    r = c.completions.create(model="", prompt=prompt, max_tokens=10, temperature=0, extra_body=EXACT)
    ids = smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    want = OnnxRuntimeBackend(artifacts["genai"]).generate(ids, 10)
    assert r.choices[0].text == smol_tokenizer.decode(want, skip_special_tokens=True)

    r = c.completions.create(model="", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True,
                             extra_body=EXACT)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt) and lp.token_logprobs[0] is None
    assert len(lp.tokens) == len(ids) + 3 and all(len(t) == 2 for t in lp.top_logprobs[1:])
    model = AutoModelForCausalLM.from_pretrained(artifacts["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    ref_lp = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    served = np.array(lp.token_logprobs[1:len(ids)], dtype=float)
    assert np.max(np.abs(served - np.array(ref_lp))) <= TOLERANCES["fp32"]["mean_abs_diff"]
    for refused in ({"seed": 3}, {"logprobs": True, "stream": True}):  # a seed needs a paged-KV engine in 0.18
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], **refused)
        assert err.value.body["param"] == next(iter(refused))
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2000}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "model": "someone-else"}, headers=AUTH, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_chat_logprobs_match_pytorch(server, artifacts, smol_tokenizer):
    """Greedy chat with logprobs: each chosen token's log-probability (and the top alternatives) as PyTorch
    computes them on the same prompt, within verify's fp32 tolerance, on both runtimes."""
    import torch
    from transformers import AutoModelForCausalLM

    _, url, _ = server
    messages = [{"role": "user", "content": "Name a colour"}]
    r = client(url).chat.completions.create(model="", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                            top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 2 for e in content)
    text = smol_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(artifacts["hf"], dtype=torch.float32).eval()
    tol = TOLERANCES["fp32"]["mean_abs_diff"]
    with torch.no_grad():
        for entry in content:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            best = torch.topk(logp, 2)
            assert entry.logprob == pytest.approx(float(best.values[0]), abs=tol)
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx([float(v) for v in best.values], abs=tol)
            ids.append(int(best.indices[0]))


def test_completion_logprobs_match_pytorch(server, artifacts, smol_tokenizer):
    """Greedy completion with logprobs=2: OpenAI's completions shape, values as PyTorch computes them."""
    import torch
    from transformers import AutoModelForCausalLM

    _, url, _ = server
    prompt = "The history of the printing press"
    r = client(url).completions.create(model="", prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                       extra_body=EXACT)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    ids = smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(artifacts["hf"], dtype=torch.float32).eval()
    tol = TOLERANCES["fp32"]["mean_abs_diff"]
    with torch.no_grad():
        for chosen, alternatives in zip(lp.token_logprobs, lp.top_logprobs):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            best = torch.topk(logp, 2)
            assert chosen == pytest.approx(float(best.values[0]), abs=tol)
            assert sorted(alternatives.values(), reverse=True) == pytest.approx([float(v) for v in best.values],
                                                                                abs=tol)
            ids.append(int(best.indices[0]))


def test_gguf_refuses_what_llama_server_cannot_answer(server):
    runtime, url, _ = server
    if runtime != "gguf":
        pytest.skip("llama-server specifics")
    with pytest.raises(openai.BadRequestError) as err:
        client(url).completions.create(model="", prompt="Hi", max_tokens=2, extra_body={"min_tokens": 2})
    assert err.value.body["param"] == "min_tokens"


@pytest.fixture(scope="module")
def torch_logprobs(artifacts):
    """PyTorch's log-probabilities (float64, every position) for a list of token ids, from the fp32 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(artifacts["hf"], dtype=torch.float32).eval()

    def logp(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()

    return logp


def test_echo_prompt_logprobs_match_pytorch(server, smol_tokenizer, torch_logprobs):
    """echo + logprobs scores the prompt: each prompt token's log-probability given the ones before it (None for
    the first) and the top alternatives, as PyTorch computes them within verify's fp32 tolerance, on both
    runtimes; in lm-eval's request shape (token ids, logprobs 1, max_tokens 1 in lm-eval 0.4.13, a seed,
    temperature 0) and in OpenAI's legacy scoring shape (max_tokens 0: nothing generated)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    _, url, _ = server
    tol = TOLERANCES["fp32"]["mean_abs_diff"]
    prompt = "The history of the printing press begins in"
    ids = smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ref = torch_logprobs(ids)
    want = np.array([ref[i - 1, ids[i]] for i in range(1, len(ids))])
    for max_tokens in (0, 1):
        r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "", "prompt": [ids], "echo": True, "logprobs": 2, "max_tokens": max_tokens,
                             "temperature": 0, "seed": 1234})
        assert r.status_code == 200, r.text
        answer = r.json()
        (choice,) = answer["choices"]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert choice["text"].startswith(prompt) and "".join(lp["tokens"][:len(ids)]) == prompt
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        assert answer["usage"]["prompt_tokens"] == len(ids) and answer["usage"]["completion_tokens"] == max_tokens
        served = np.array(lp["token_logprobs"][1:len(ids)], dtype=float)
        assert np.max(np.abs(served - want)) <= tol
        for i in range(1, len(ids)):  # the alternatives: PyTorch's two most likely tokens' values
            best = np.sort(ref[i - 1])[::-1][:2]
            assert sorted(lp["top_logprobs"][i].values(), reverse=True) == pytest.approx(list(best), abs=tol)
        if max_tokens:  # greedy: the generated token is (within tolerance) PyTorch's most likely one
            assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1].max()), abs=tol)
            assert lp["text_offset"][len(ids)] == len(prompt)  # where the completion starts in the text
    # What lm-eval reads from that answer: the continuation's summed log-probability (the last token, generated,
    # is dropped): here the prompt's last 4 tokens as the continuation of the ones before.
    ctxlen = len(ids) - 4
    ((loglikelihood, _),) = LocalCompletionsAPI.parse_logprobs(answer, ctxlens=[ctxlen])
    assert loglikelihood == pytest.approx(float(want[ctxlen - 1:].sum()), abs=4 * tol)
    # A text prompt is tokenized by the runtime (here as by the HF tokenizer): the echo covers its tokens.
    c = client(url)
    r = c.completions.create(model="", prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    assert r.choices[0].text == prompt and "".join(r.choices[0].logprobs.tokens) == prompt
    assert np.max(np.abs(np.array(r.choices[0].logprobs.token_logprobs[1:], dtype=float) - want)) <= tol
    assert r.choices[0].logprobs.top_logprobs[1] == {}
    # echo without logprobs, streamed: the prompt comes first, then the same greedy text as without echo
    plain = c.completions.create(model="", prompt=prompt, max_tokens=3, temperature=0, extra_body=EXACT)
    chunks = [ch for ch in c.completions.create(model="", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                                stream=True, extra_body=EXACT) if ch.choices]
    assert chunks[0].choices[0].text == prompt
    assert "".join(ch.choices[0].text for ch in chunks) == prompt + plain.choices[0].text
    r = c.completions.create(model="", prompt=[ids], max_tokens=0, echo=True)  # echo without logprobs
    assert r.choices[0].text == prompt and r.choices[0].logprobs is None and r.usage.prompt_tokens == len(ids)


def test_scoring_requests_that_are_refused(server):
    _, url, _ = server

    def post(**fields):
        return httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=30, json={"model": "", **fields})

    for fields, param in (({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),  # nothing to do without echo
                          ({"prompt": [5, 1_000_000], "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt"),
                          ({"prompt": [5, 1_000_000], "max_tokens": 2}, "prompt")):
        r = post(**fields)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    for bad in ([[1, 2], [3, 4]], [], [[]], [1, "a"], [-1], [True, 2]):
        r = post(prompt=bad, max_tokens=1)
        assert r.status_code == 400 and "prompt" in r.json()["error"]["message"], (bad, r.text)
    r = post(prompt=[5] * 1100, echo=True, logprobs=1, max_tokens=0)  # longer than either server's context
    assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text


MC_TASK = "fusedeploy_serve_mc"


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    """A local lm-eval multiple-choice task (tests/data/serve-mc.jsonl, 20 questions, 4 choices): its folder."""
    import yaml

    folder = tmp_path_factory.mktemp("tasks")
    (folder / f"{MC_TASK}.yaml").write_text(yaml.safe_dump({
        "task": MC_TASK, "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(REPO / "tests" / "data" / "serve-mc.jsonl")}},
        "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    return folder


def _lm_eval(mc_task: Path, model: str, args: dict, **env) -> dict:
    """lm-eval on the local task, offline: accuracy, and each question's choices' log-likelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}.items():
            mp.setenv(k, v)
        out = simple_evaluate(model=model, model_args=args, tasks=[MC_TASK],
                              task_manager=TaskManager(include_path=str(mc_task), include_defaults=False))
    samples = sorted(out["samples"][MC_TASK], key=lambda s: s["doc_id"])
    return {"acc": out["results"][MC_TASK]["acc,none"], "acc_norm": out["results"][MC_TASK]["acc_norm,none"],
            "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
            "arguments": [[tuple(a) for a in s["arguments"]] for s in samples]}


@pytest.fixture(scope="module")
def hf_task_scores(artifacts, mc_task):
    return _lm_eval(mc_task, "hf", {"pretrained": str(artifacts["hf"]), "dtype": "float32", "device": "cpu",
                                    "batch_size": 8})


def test_lm_eval_local_completions_through_the_server_matches_hf(server, artifacts, mc_task, hf_task_scores,
                                                                 smol_tokenizer):
    """lm-eval's `local-completions` model scoring a multiple-choice task through each server gives the accuracy
    of lm-eval's `hf` model on the PyTorch checkpoint, and each choice's log-likelihood within verify's fp32
    tolerance per continuation token (requests PARALLEL at a time: the scoring runs concurrently)."""
    _, url, _ = server
    model_id = client(url).models.list().data[0].id
    served = _lm_eval(mc_task, "local-completions",
                      {"base_url": f"{url}/v1/completions", "model": model_id, "tokenizer": str(artifacts["hf"]),
                       "tokenizer_backend": "huggingface", "num_concurrent": PARALLEL, "max_retries": 1},
                      OPENAI_API_KEY=KEY)
    ref = hf_task_scores
    assert served["arguments"] == ref["arguments"]
    assert abs(served["acc"] - ref["acc"]) <= 0.02 and abs(served["acc_norm"] - ref["acc_norm"]) <= 0.02
    tol = TOLERANCES["fp32"]["mean_abs_diff"]
    for args, got, want in zip(ref["arguments"], served["loglikelihoods"], ref["loglikelihoods"]):
        for (context, continuation), g, w in zip(args, got, want):
            whole = len(smol_tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
            n = whole - len(smol_tokenizer(context, add_special_tokens=False)["input_ids"])
            assert g == pytest.approx(w, abs=tol * max(1, n)), (context, continuation)


# ---------------------------------------------------------------- bench-serve

def test_bench_serve_stops_by_itself_within_its_duration(server):
    _, url, _ = server
    duration = 2.0
    t0 = time.perf_counter()
    result = bench_serve(url, [1, 3], duration, max_tokens=4, api_key=KEY)
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


@pytest.mark.slow
def test_guidellm_default_chat_benchmark_runs_clean(server, artifacts, tmp_path):
    """guidellm (vLLM's load generator) against each server, offline, tokenizer from the model folder: its
    default request shape (streamed /v1/chat/completions with continuous usage stats, ignore_eos, synthetic
    prompts), shortened to 6 requests at concurrency 2: every one succeeds with the output length asked."""
    import importlib.util

    if importlib.util.find_spec("guidellm") is None:
        pytest.skip("guidellm is not installed (it is in the test extra: pip install -e '.[test]')")
    _, url, _ = server
    model_id = client(url).models.list().data[0].id
    out = tmp_path / "guidellm.json"
    cmd = [sys.executable, "-m", "guidellm", "run",
           "--backend", f"kind=openai_http,target={url},model={model_id},api_key={KEY}",
           "--profile", "kind=concurrent,streams=2", "--constraint", "kind=max_requests,count=6",
           "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
           "--tokenizer", f"kind=huggingface_auto,model={artifacts['hf']}",
           "--output", f"kind=json,path={out}", "--disable-console"]
    done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and out.is_file(), (done.stdout + done.stderr)[-4000:]
    run = json.loads(out.read_text())["benchmarks"][0]
    assert run["metrics"]["request_totals"] == {"successful": 6, "errored": 0, "incomplete": 0, "total": 6}
    produced = run["metrics"]["output_token_count"]["successful"]
    assert produced["min"] == produced["max"] == 8


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
    r = run("serve", str(artifacts["genai"]), "--port", "0", "--api-key", " ")
    assert r.returncode == 2 and "--api-key" in (r.stdout + r.stderr)
    missing = subprocess.run([sys.executable, "-m", "fusedeploy.cli", "serve", str(artifacts["gguf"]), "--port", "0"],
                             cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "FUSEDEPLOY_LLAMA_SERVER": str(tmp_path / "no-such-binary")})
    assert missing.returncode == 2 and "make setup" in missing.stderr + missing.stdout
    r = run("bench-serve", "http://127.0.0.1:1", "--concurrency", "1,x")
    assert r.returncode == 2 and "--concurrency" in (r.stdout + r.stderr)


def test_bench_serve_rate_mode_with_prompts_from_a_file_and_goodput(server, tmp_path):
    _, url, _ = server
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Question {i}: what comes after {i}?"}) for i in range(20)))
    result = bench_serve(url, [], 2.0, rates=[4.0], prompts=prompts, output_len="uniform:2-4", slo_ttft_s=30,
                         slo_itl_s=30, api_key=KEY)
    (lv,) = result["levels"]
    assert lv["mode"] == "rate" and lv["rate"] == 4.0 and lv["concurrency"] is None
    assert lv["errors"] == 0, lv["first_error"]
    assert lv["requests_started"] >= 1 and lv["wall_s"] < 2.0 + 4.5
    assert lv["goodput_requests_per_s"] == pytest.approx(lv["requests_per_s"])  # a 30 s SLO: all completed are good
    assert result["prompts"] == "jsonl records"
    strict = bench_serve(url, [1], 1.5, max_tokens=3, slo_ttft_s=1e-9, api_key=KEY)["levels"][0]
    assert strict["goodput_requests_per_s"] == 0 and (strict["requests_completed"] == 0 or strict["slo_attained"] == 0)


def test_bench_prompts_are_distinct_and_lengths_follow_the_spec(tmp_path):
    from fusedeploy.serve.bench import Lengths, Prompts

    source = Prompts(None, Lengths.parse("uniform:8-16", "--prompt-len"), seed=1)
    drawn = [source.draw() for _ in range(200)]
    assert len({p.split()[0] + " " + p.split()[1] + " " + p.split()[2] for p in drawn}) > 190  # no shared prefix
    assert all(8 <= len(p.split()) <= 16 for p in drawn)
    import random

    rng = random.Random(0)
    assert {Lengths.parse("5", "x").draw(rng)} == {5}
    assert all(3 <= Lengths.parse("uniform:3-6", "x").draw(rng) <= 6 for _ in range(50))
    assert all(Lengths.parse("normal:10,3", "x").draw(rng) >= 1 for _ in range(50))
    for bad in ("0", "uniform:5-2", "gauss:3", "normal:3", "-1", "fixed:"):
        with pytest.raises(UserError):
            Lengths.parse(bad, "--output-len")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        Prompts(bad_jsonl, Lengths.parse("4", "x"))


@pytest.mark.parametrize("args,complaint", [
    (["--concurrency", "1,,2"], "--concurrency"),
    (["--concurrency", "1,x"], "--concurrency"),
    (["--concurrency", "0"], "--concurrency"),
    (["--rate", "1,,2"], "--rate"),
    (["--rate", "inf"], "--rate"),
    (["--rate", "-1"], "--rate"),
    (["--duration", "nan"], "--duration"),
    (["--duration", "inf"], "--duration"),
    (["--duration", "0"], "--duration"),
    (["--duration", "-3"], "--duration"),
    (["--output-len", "uniform:9-1"], "--output-len"),
    (["--slo-ttft", "0"], "--slo-ttft"),
])
def test_bench_serve_cli_refuses_malformed_arguments(run_cli, args, complaint):
    code, out, err = run_cli("bench-serve", "http://127.0.0.1:1", *args)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and complaint in lines[0], out + err
