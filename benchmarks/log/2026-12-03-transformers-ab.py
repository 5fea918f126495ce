"""Same torch, two transformers: where does the CPU time of SmolLM2-shaped work go?"""
import time, torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                  rope_theta=100000.0)
m = LlamaForCausalLM(cfg).float().eval()
ids = torch.randint(0, 49152, (8, 256))
def t(f, n):
    f(); t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n
with torch.no_grad():
    fwd = t(lambda: m(input_ids=ids, use_cache=False), 3)
    h = torch.randn(8, 256, 576)
    mlp = t(lambda: m.model.layers[0].mlp(h), 10)
def fb():
    out = m(input_ids=ids[:4], use_cache=False).logits
    out.float().mean().backward()
m.requires_grad_(True)
bwd = t(fb, 2)
m.requires_grad_(False)
first = torch.randint(0, 49152, (16, 1))
with torch.no_grad():
    gen = t(lambda: m.generate(first, attention_mask=torch.ones_like(first), do_sample=True, top_k=0,
                               max_new_tokens=63, min_new_tokens=63, pad_token_id=0), 1)
print(f"transformers {transformers.__version__}: forward 8x256 {fwd:.3f} s | mlp {mlp*1000:.1f} ms | fwd+bwd 4x256 {bwd:.3f} s | generate 16x64 {gen:.3f} s | threads {torch.get_num_threads()}", flush=True)
