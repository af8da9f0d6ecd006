"""Cost of one sensitivity layer group: as a child run (model load + MLflow run + full probe) or inside
one run (cached layer inputs, re-run from the group's layer). Numbers quoted in docs/mixed-precision.md.

    python benchmarks/sensitivity_cost.py   (from the repository root; writes /tmp/sensitivity-cost.db)
"""
import json
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_config
from dataclasses import asdict
from sweep.models.loading import load_model
from sweep.measure.probe import probe_tokens, probe_perplexity
from sweep.measure.sensitivity import layer_groups, rtn_quantized, _head_nll
from sweep.quant.layers import LayerInputs, capture_first_layer_inputs, decoder_layers, run_layer
from sweep.tracking.tracker import Tracker, flatten
import torch
cfg = make_config("model=smollm2-135m", "method=rtn", "tracking.uri=sqlite:////tmp/sensitivity-cost.db")
def clock(fn):
    w, c = time.perf_counter(), time.process_time(); out = fn(); return out, time.perf_counter() - w, time.process_time() - c
(model, tok), lw, lc = clock(lambda: load_model(cfg.model, "cpu", cfg.cache_dir))
tracker = Tracker(cfg.tracking, "measure")
def mlflow_run():
    rid = tracker.create_run("x", {"a": 1}); tracker.log_params(rid, flatten(asdict(cfg))); tracker.log_text(rid, "x", "config.yaml")
    tracker.set_tags(rid, {"b": 2}); tracker.log_metrics(rid, {"m": 1.0}); tracker.log_json(rid, {}, "q.json"); tracker.finish(rid)
_, mw, mc = clock(mlflow_run)
tokens = probe_tokens(tok, [2, 3], 512)
_, fw, fc = clock(lambda: probe_perplexity(model, tokens, 512))
windows = [tokens.unsqueeze(0)]
first = capture_first_layer_inputs(model, windows)
layers = decoder_layers(model)
states = [first.hidden]
for layer in layers: states.append(run_layer(layer, LayerInputs(states[-1], first.kwargs)))
groups = {g.name: g for g in layer_groups(model, True)}
def suffix(i):
    g = groups[f"layers.{i}.mlp"]
    with rtn_quantized(g.modules, 2, 128, True):
        h = states[i]
        for j in range(i, len(layers)): h = run_layer(layers[j], LayerInputs(h, first.kwargs))
        return _head_nll(model, h, windows)
sw, sc = [], []
for i in (0, 10, 20, 29):
    _, w, c = clock(lambda: suffix(i)); sw.append(w); sc.append(c)
print(json.dumps({"load_wall": lw, "load_cpu": lc, "mlflow_run_wall": mw, "mlflow_run_cpu": mc, "full_probe_wall": fw, "full_probe_cpu": fc,
                  "suffix_wall_layers_0_10_20_29": sw, "suffix_cpu": sc}, indent=1))
