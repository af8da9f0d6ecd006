"""Why does a packed model's static-cache decode not compile into one graph? Ask dynamo.

Builds a 2-layer Llama-shaped model, quantizes it with GPTQModel (4-bit, g128), reloads it on
`kernel`, and runs torch._dynamo.explain on one decode step with a static cache; prints the
graph count, the graph breaks and their reasons, and the modules' classes. The fp16 source
model is explained the same way for comparison.
usage: python benchmarks/device/graph_breaks.py [cuda|cpu] [kernel] [tokenizer dir]
"""
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, StaticCache

from sweep.backends.gptqmodel_backend import load_packed


def explain(model, label, device):
    step = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    cache = StaticCache(config=model.config, max_cache_len=64)
    result = torch._dynamo.explain(model)(input_ids=step, past_key_values=cache,
                                          cache_position=torch.tensor([0], device=device), use_cache=True)
    print(f"EXPLAIN {label}: graphs={result.graph_count} breaks={result.graph_break_count}", flush=True)
    seen = set()
    for reason in result.break_reasons:
        where = " | ".join(str(frame).strip()[:160] for frame in reason.user_stack[-2:])
        key = (reason.reason[:200], where)
        if key not in seen:
            seen.add(key)
            print(f"  BREAK {reason.reason[:300]!r}\n    at {where}", flush=True)


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    kernel = sys.argv[2] if len(sys.argv) > 2 else "tinygemm_int4"
    tok_dir = sys.argv[3] if len(sys.argv) > 3 else os.path.join(os.environ.get("STATE", "."), "tok")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=8, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config, dtype=torch.float16).to(device)
    src_dir, packed_dir = "/tmp/gb_src", "/tmp/gb_packed"
    source.save_pretrained(src_dir)
    tokenizer.save_pretrained(src_dir)
    explain(source.eval(), "fp16 source", device)
    del source
    from gptqmodel import GPTQModel, QuantizeConfig

    quantizer = GPTQModel.load(src_dir, QuantizeConfig(bits=4, group_size=128), device=device)
    samples = [torch.randint(0, config.vocab_size, (64,)).tolist() for _ in range(8)]
    quantizer.quantize([{"input_ids": s, "attention_mask": [1] * 64} for s in samples], batch_size=4)
    quantizer.save(packed_dir)
    del quantizer
    model = load_packed(packed_dir, device, kernel)
    layer = model.model.layers[0]
    print("CLASSES", type(model).__module__, type(layer).__module__, type(layer.self_attn).__module__,
          type(layer.mlp).__module__, type(layer.self_attn.q_proj).__name__, flush=True)
    print("ATTN", model.config._attn_implementation, "QUANTIZER", type(getattr(model, "hf_quantizer", None)).__name__)
    hooks = [(name, fn) for name, module in model.named_modules()
             for fn in list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())]
    print("HOOKS", len(hooks), [(n, getattr(f, "__qualname__", f)) for n, f in hooks[:6]], flush=True)
    explain(model, f"gptq 4-bit on {kernel}", device)


if __name__ == "__main__":
    main()
