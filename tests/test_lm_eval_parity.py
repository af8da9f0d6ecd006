"""The sweep's quality numbers are lm-eval's own: same model, same task files, the `lm_eval` CLI agrees."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_config
from sweep.measure.quality import evaluate
from sweep.models.loading import load_model
from sweep.data.tasks import write_task_dir


def test_sweep_numbers_equal_lm_eval_cli(embedded_model_dir, tmp_path):
    # The 4-layer stand-in, saved as an ordinary checkpoint for the CLI: parity is about the scoring
    # path, not the model, and it is ~7x cheaper to score than the full model. One CLI process scores
    # both tasks, each on the documents the sweep's limits pick (the first N).
    cfg = make_config("model=smollm2-135m-4l", "method=fp16", "model.dtype=float32",
                      "eval.limit.wikitext=1", "eval.limit.lambada=30")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    checkpoint = tmp_path / "model-4l"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    ours, _, _ = evaluate(model, tokenizer, cfg.eval, tmp_path / "ours")

    task_dir = write_task_dir(tmp_path / "tasks")
    cli = Path(sys.executable).with_name("lm_eval")
    out = tmp_path / "cli"
    samples = {"sweep_wikitext": [0], "sweep_lambada": list(range(30))}
    proc = subprocess.run(
        [str(cli), "--model", "hf", "--model_args",
         f"pretrained={checkpoint},dtype=float32,max_length={cfg.eval.max_length}",
         "--include_path", str(task_dir), "--tasks", ",".join(samples), "--samples", json.dumps(samples),
         "--batch_size", str(cfg.eval.batch_size), "--device", "cpu", "--output_path", str(out)],
        capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                         "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert ours["wikitext.word_perplexity"] == pytest.approx(results["sweep_wikitext"]["word_perplexity,none"], rel=1e-4)
    assert ours["wikitext.bits_per_byte"] == pytest.approx(results["sweep_wikitext"]["bits_per_byte,none"], rel=1e-4)
    assert ours["lambada.perplexity"] == pytest.approx(results["sweep_lambada"]["perplexity,none"], rel=1e-4)
    assert ours["lambada.acc"] == pytest.approx(results["sweep_lambada"]["acc,none"], abs=1e-9)
