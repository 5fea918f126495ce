"""Calibration text the model writes itself: needs no dataset and follows the model's own distribution.

LLM-QAT (Liu et al., 2023) distilled quantized models on text sampled from the full-precision
model and found it works as well as real data. Each sequence starts from one token drawn
uniformly from the ordinary vocabulary and continues by sampling the dense model's next-token
distribution (by default at temperature 1 with no truncation, i.e. exactly the model's own
distribution; the settings `self_temperature` and `self_top_p` narrow it), batched, with the KV cache. LLM-QAT
reports that taking the first 3-5 generated tokens greedily and sampling the rest gave better data than
sampling throughout; `self_greedy_tokens` does that. Two more candidates for the default mix in the built-in
text (Python's help topics, `data.sources`): `self_prompt_tokens` starts each sequence from a window of it
instead of one random token (varied prompts), and `self_builtin_share` takes that share of the sequences from
it whole. A last candidate writes longer samples (`self_sample_tokens`) and cuts each into seq_len windows:
the same number of tokens, but most windows continue text the model has already written for a while rather
than starting from a random token. Seeded: the same model, seed and sizes give the same tokens, so a resumed run
sees the same samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..builtin import SELF_CALIB as SELF  # the --calib value that selects this source
from ..data import BUILTIN, load_text, sample_sequences, tokenize


def self_calibration(model, tokenizer, count: int, settings, report=None) -> torch.Tensor:
    """The `--calib self` sequences a run calibrates on, as its settings ask: [count, seq_len]."""
    length, seed, prompt = settings.seq_len, settings.seed, settings.self_prompt_tokens
    whole = round(settings.self_builtin_share * count)
    windows = max(1, settings.self_sample_tokens // length)  # per sample
    samples = -(-(count - whole) // windows)
    text = tokenize(tokenizer, load_text(BUILTIN)) if whole or prompt else None
    prompts = sample_sequences(text, samples, max(prompt, 2), seed + 2)[:, :prompt] if prompt else None
    sampled = generate_samples(model, tokenizer, samples, length * windows, seed,
                               temperature=settings.self_temperature, top_p=settings.self_top_p,
                               greedy=settings.self_greedy_tokens, prompts=prompts, report=report)
    if windows > 1:  # cut, then spread, so the scoring rows come from several samples
        cut = sampled.reshape(samples * windows, length)
        sampled = cut[torch.randperm(len(cut), generator=torch.Generator().manual_seed(seed + 4))[:count - whole]]
    if not whole:
        return sampled
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))  # the built-in rows, spread
    out = torch.empty(count, length, dtype=sampled.dtype)
    out[order[:whole]] = sample_sequences(text, whole, length, seed + 3)
    out[order[whole:]] = sampled
    return out


@torch.no_grad()
def generate_samples(model, tokenizer, count: int, length: int, seed: int, batch: int = 64,
                     temperature: float = 1.0, top_p: float = 1.0, greedy: int = 0,
                     prompts: torch.Tensor | None = None,
                     report: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`count` sampled sequences of `length` tokens each: [count, length].

    Batches of 64 on a CPU take a third less time than batches of 16 (per-step overhead amortized).
    `report(done, count)` after each batch: writing the text takes minutes on a CPU.
    `greedy`: how many tokens after the start are the model's top choice rather than a sample.
    `prompts`: [count, n] tokens each sequence starts from; None = one random ordinary token each.
    """
    if report is not None:
        report(0, count)
    if count == 0:
        return torch.empty(0, length, dtype=torch.long)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = model.get_input_embeddings().weight.shape[0]
    ordinary = torch.tensor([i for i in range(min(vocab, len(tokenizer))) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    starts = ordinary[torch.randint(0, len(ordinary), (count,), generator=gen)][:, None] if prompts is None else prompts
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for s in range(0, count, batch):
        torch.manual_seed(seed * 1_000_003 + s)  # generate() samples from the global generator
        seqs = starts[s:s + batch].to(model.device)
        steps = max(0, min(greedy, length - seqs.shape[1]))
        if steps:
            seqs = model.generate(seqs, attention_mask=torch.ones_like(seqs), do_sample=False, max_new_tokens=steps,
                                  min_new_tokens=steps, pad_token_id=pad, use_cache=True)
        rest = length - seqs.shape[1]
        if rest > 0:
            seqs = model.generate(seqs, attention_mask=torch.ones_like(seqs), do_sample=True, temperature=temperature,
                                  top_k=0, top_p=top_p, max_new_tokens=rest, min_new_tokens=rest,
                                  pad_token_id=pad, use_cache=True)
        out.append(seqs[:, :length].cpu())
        if report is not None:
            report(min(s + batch, count), count)
    return torch.cat(out)
