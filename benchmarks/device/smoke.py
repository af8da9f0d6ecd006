"""First contact with the GPU machine: do the backends import, quantize, save, reload and generate?

Run inside a device `run` after `. benchmarks/device/setup.sh`. Prints one RESULT line per check.
"""
import json, os, sys, time, traceback, tempfile
import torch

def step(name):
    def deco(fn):
        t = time.time()
        try:
            out = fn()
            print(f"RESULT {name}: ok {time.time()-t:.1f}s {out if out is not None else ''}", flush=True)
        except Exception as e:
            print(f"RESULT {name}: FAIL {type(e).__name__}: {str(e)[:400]}", flush=True)
            traceback.print_exc()
        return fn
    return deco

@step("versions")
def _():
    import importlib.metadata as md
    out = {}
    for p in ("torch", "transformers", "gptqmodel", "auto-round", "bitsandbytes", "lm_eval", "mlflow-skinny", "hydra-core", "triton"):
        try: out[p] = md.version(p)
        except Exception as e: out[p] = f"missing"
    out["gpu"] = torch.cuda.get_device_name(0)
    import shutil; out["nvcc"] = shutil.which("nvcc")
    return out

work = tempfile.mkdtemp()
from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
import random
random.seed(0)
words = "the cat dog runs jumps over lazy quick brown fox a model quantize weights bits tensor layer matrix data train".split()
corpus = [" ".join(random.choice(words) for _ in range(300)) for _ in range(64)]
tok = Tokenizer(models.BPE(unk_token="<unk>")); tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>","<s>","</s>","<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.decoder = decoders.ByteLevel()
hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, vocab_size=512, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3)
torch.manual_seed(0)
m = LlamaForCausalLM(cfg).to(torch.float16)
src = os.path.join(work, "tiny"); m.save_pretrained(src); hf.save_pretrained(src)
calib_ids = [{"input_ids": hf(c).input_ids[:256], "attention_mask": [1]*min(256, len(hf(c).input_ids))} for c in corpus[:32]]

def kernels(model):
    return sorted({type(x).__name__ for x in model.modules() if "Quant" in type(x).__name__ or "Linear4bit" in type(x).__name__ or "Linear8bit" in type(x).__name__})

for bits in (4, 3, 2, 8):
    @step(f"gptqmodel w{bits}")
    def _():
        from gptqmodel import GPTQModel, QuantizeConfig
        q = GPTQModel.load(src, QuantizeConfig(bits=bits, group_size=128, sym=True, desc_act=False, damp_percent=0.01), device="cuda")
        q.quantize(calib_ids, batch_size=4)
        out = os.path.join(work, f"g{bits}"); q.save(out); del q
        res = {}
        for be in ("auto", "gptq_triton", "gptq_torch", "gptq_marlin", "gptq_exllama_v2"):
            try:
                t = time.time(); r = GPTQModel.load(out, device="cuda", backend=be)
                ids = torch.tensor([calib_ids[0]["input_ids"][:32]], device="cuda")
                with torch.no_grad(): lo = r.model(ids).logits
                res[be] = (kernels(r.model), round(time.time()-t, 1), bool(torch.isfinite(lo).all()))
                del r
            except Exception as e:
                res[be] = f"FAIL {type(e).__name__}: {str(e)[:150]}"
        return res

@step("gptqmodel awq w4")
def _():
    from gptqmodel import GPTQModel, QuantizeConfig
    q = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=128, quant_method="awq", format="gemm"), device="cuda")
    q.quantize(calib_ids, batch_size=4)
    out = os.path.join(work, "awq4"); q.save(out); del q
    r = GPTQModel.load(out, device="cuda")
    return kernels(r.model)

@step("autoround w4 iters=10")
def _():
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    ar = AutoRound(model, tokenizer=hf, bits=4, group_size=128, sym=True, iters=10, nsamples=8, seqlen=128, batch_size=4, lr=None, dataset=corpus[:16], device_map="cuda")
    out = os.path.join(work, "ar4"); ar.quantize_and_save(out, format="auto_round")
    r = AutoModelForCausalLM.from_pretrained(out, device_map="cuda")
    fmt = {}
    for f in ("auto_gptq", "auto_awq"):
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
            ar = AutoRound(model, tokenizer=hf, bits=4, group_size=128, sym=True, iters=0, nsamples=8, seqlen=128, dataset=corpus[:16], device_map="cuda")
            o = os.path.join(work, "ar4" + f); ar.quantize_and_save(o, format=f)
            fmt[f] = kernels(AutoModelForCausalLM.from_pretrained(o, device_map="cuda"))
        except Exception as e:
            fmt[f] = f"FAIL {type(e).__name__}: {str(e)[:150]}"
    return kernels(r), os.listdir(out), fmt

@step("autoround w3 fake")
def _():
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    ar = AutoRound(model, tokenizer=hf, bits=5, group_size=128, sym=True, iters=0, nsamples=8, seqlen=128, dataset=corpus[:16], device_map="cuda")
    out = os.path.join(work, "ar5"); ar.quantize_and_save(out, format="fake")
    r = AutoModelForCausalLM.from_pretrained(out, device_map="cuda")
    return kernels(r), type(r.model.layers[0].mlp.down_proj).__name__

@step("bnb nf4 / int8")
def _():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    out = {}
    for name, bc in {"nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16),
                     "int8": BitsAndBytesConfig(load_in_8bit=True)}.items():
        r = AutoModelForCausalLM.from_pretrained(src, quantization_config=bc, device_map="cuda", dtype=torch.float16)
        ids = torch.tensor([calib_ids[0]["input_ids"][:32]], device="cuda")
        with torch.no_grad(): lo = r(ids).logits
        out[name] = (kernels(r), r.get_memory_footprint())
    return out

@step("static cache + compile generate")
def _():
    from transformers import AutoModelForCausalLM, GenerationConfig
    r = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).cuda()
    ids = torch.tensor([calib_ids[0]["input_ids"][:16]], device="cuda")
    res = {}
    for impl in ("dynamic", "static"):
        kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=3)
        if impl == "static": kw["cache_implementation"] = "static"
        for i in range(3):
            torch.cuda.synchronize(); t = time.time(); r.generate(ids, **kw); torch.cuda.synchronize()
        res[impl] = round(64 / (time.time() - t), 1)
    return res
