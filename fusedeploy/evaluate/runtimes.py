"""Logits backends for the device runtimes: llama.cpp (GGUF) and ONNX Runtime (ONNX folder).

Both score a window the same way the PyTorch backend does (one forward pass
over the whole window, logits for every position), so `perplexity` compares
like with like. Which backend opens a path is `fusedeploy.formats`' answer
(`runtime_for_path`, `Artifact.open`); every backend takes the same
constructor arguments so the catalogue can open any of them one way.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class LlamaCppBackend:
    """A GGUF file in llama.cpp (llama-cpp-python), all-position logits."""

    name = "llama.cpp"

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None,
                 logits_all: bool = True):
        """`logits_all=False` computes only the last position (what an app does; for profiling)."""
        from llama_cpp import Llama

        path = Path(gguf_path)
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        try:
            self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                             n_threads=n_threads or _threads(), verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"llama.cpp cannot load {path}: {exc}") from None
        self.n_ctx = n_ctx

    @property
    def block_count(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_model_n_layer(self.llm.model))

    def logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise UserError(f"window of {len(ids)} tokens is longer than the llama.cpp context {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `ids`, new tokens only."""
        self.llm.reset()
        out = []
        for token in self.llm.generate(list(map(int, ids)), temp=0.0, top_k=1, reset=True):
            out.append(int(token))
            if len(out) >= max_new_tokens:
                break
        return out

    @property
    def vocab_size(self) -> int:
        return int(self.llm.n_vocab())

    def start(self, ids: list[int]) -> int:
        """Prefill a prompt from an empty cache; the greedy next token."""
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def step(self, token: int) -> int:
        """Feed one token through the KV cache; the greedy next token."""
        self.llm.eval([int(token)])
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __del__(self):  # llama-cpp-python's own finalizer fails at interpreter exit
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class OnnxRuntimeBackend:
    """An exported ONNX folder in ONNX Runtime.

    A folder with `genai_config.json` (the default export, ONNX Runtime
    GenAI's builder) runs in `onnxruntime_genai`: logits from one
    `og.Generator` pass over the window, decoding in its C++ loop. A folder
    without one (`export onnx --engine optimum`, standard operators only)
    runs through Optimum's `ORTModelForCausalLM`.
    """

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | os.PathLike, n_ctx: int | None = None, n_threads: int | None = None,
                 logits_all: bool = True):
        """`n_ctx` and `logits_all` are accepted for the common signature: each call sizes its own KV buffer."""
        folder = Path(onnx_dir)
        if not (folder / "model.onnx").is_file():
            raise UserError(f"{folder} is not an exported ONNX model folder (no model.onnx)")
        self.folder = folder
        self.n_ctx = n_ctx
        self.genai = (folder / "genai_config.json").is_file()
        if self.genai:
            self._open_genai(folder, n_threads or _threads())
        else:
            self._open_optimum(folder, n_threads or _threads())

    # ---- ONNX Runtime GenAI
    def _open_genai(self, folder: Path, n_threads: int) -> None:
        import json

        import onnxruntime_genai as og

        try:
            config = og.Config(str(folder))
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": n_threads, "inter_op_num_threads": 1}}}}))
            self.og_model = og.Model(config)
        except Exception as exc:  # noqa: BLE001 - og raises RuntimeError with the reason
            raise UserError(f"ONNX Runtime GenAI cannot load {folder}: {str(exc).splitlines()[0]}") from None
        cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
        self._vocab = int(cfg["vocab_size"])
        self.context_length = int(cfg["context_length"])
        # Sliding-window layers keep a ring of `window_size` positions, and og refuses a KV buffer smaller
        # than that ring, however short the sequence.
        self._min_kv = int((cfg.get("decoder", {}).get("sliding_window") or {}).get("window_size", 0) or 0)
        self._gen = None

    def _generator(self, max_length: int, min_length: int = 0):
        """A greedy generator whose KV buffer holds `max_length` tokens (not the model's whole context)."""
        import onnxruntime_genai as og

        if max_length > self.context_length:
            raise UserError(f"{max_length} tokens exceed the model's context length {self.context_length}")
        params = og.GeneratorParams(self.og_model)
        # Every search option explicitly: genai_config.json carries the model's generation_config
        # (a repetition penalty, say), which would make "greedy" something else.
        capacity = min(self.context_length, max(max_length, self._min_kv))
        params.set_search_options(max_length=capacity, min_length=min_length, do_sample=False,
                                  repetition_penalty=1.0, num_beams=1, top_k=1)
        return og.Generator(self.og_model, params)

    # ---- Optimum
    def _open_optimum(self, folder: Path, n_threads: int) -> None:
        import onnxruntime as ort

        from ..optional import require_optimum

        require_optimum(f"reading {folder} (an ONNX folder without genai_config.json)")
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads
        try:
            self.model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, session_options=options,
                                                             provider="CPUExecutionProvider")
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types for bad files
            raise UserError(f"ONNX Runtime cannot load {folder}: {str(exc).splitlines()[0]}") from None

    def logits(self, ids: list[int]) -> np.ndarray:
        if self.genai:
            gen = self._generator(len(ids))
            gen.append_tokens(list(map(int, ids)))
            out = np.array(gen.get_output("logits")[0], dtype=np.float32)
            del gen
            return out
        import torch

        input_ids = torch.tensor([ids], dtype=torch.long)
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        return np.asarray(out.logits[0], dtype=np.float32)

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `ids` using the KV cache, new tokens only (exactly `max_new_tokens`)."""
        if self.genai:
            total = len(ids) + max_new_tokens
            gen = self._generator(total, min_length=total)  # min_length: no early stop at EOS, like min_new_tokens
            gen.append_tokens(list(map(int, ids)))
            out = []
            while len(out) < max_new_tokens and not gen.is_done():
                gen.generate_next_token()
                out.append(int(gen.get_next_tokens()[0]))
            return out
        import torch

        input_ids = torch.tensor([ids], dtype=torch.long)
        out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  do_sample=False, use_cache=True)
        return out[0, len(ids):].tolist()

    @property
    def vocab_size(self) -> int:
        return self._vocab if self.genai else int(self.model.config.vocab_size)

    def start(self, ids: list[int], max_new_tokens: int = 256) -> int:
        """Prefill a prompt with an empty KV cache; the greedy next token."""
        if self.genai:
            self._gen = None  # free the previous buffer first
            self._gen = self._generator(min(self.context_length, max(self.n_ctx or 0, len(ids) + max_new_tokens)))
            self._gen.append_tokens(list(map(int, ids)))
            return int(np.argmax(self._gen.get_logits()[0]))
        import torch

        self._ids = torch.tensor([ids], dtype=torch.long)
        out = self.model(input_ids=self._ids, attention_mask=torch.ones_like(self._ids), use_cache=True)
        self._past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(self, token: int) -> int:
        """Feed one token through the KV cache; the greedy next token."""
        if self.genai:
            self._gen.append_tokens([int(token)])
            return int(np.argmax(self._gen.get_logits()[0]))
        import torch

        new = torch.tensor([[int(token)]], dtype=torch.long)
        self._ids = torch.cat([self._ids, new], dim=1)
        out = self.model(input_ids=new, attention_mask=torch.ones_like(self._ids),
                         past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def close(self) -> None:
        self._gen = None
        self.og_model = None
