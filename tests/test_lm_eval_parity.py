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
    cfg = make_config("method=fp16", "model.dtype=float32", "eval.limit.wikitext=1", "eval.limit.lambada=30")
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    ours, _, _ = evaluate(model, tokenizer, cfg.eval, tmp_path / "ours")

    task_dir = write_task_dir(tmp_path / "tasks")
    cli = Path(sys.executable).with_name("lm_eval")
    for task, limit in (("sweep_wikitext", 1), ("sweep_lambada", 30)):
        out = tmp_path / f"cli-{task}"
        proc = subprocess.run(
            [str(cli), "--model", "hf", "--model_args",
             f"pretrained={embedded_model_dir},dtype=float32,max_length={cfg.eval.max_length}",
             "--include_path", str(task_dir), "--tasks", task, "--limit", str(limit),
             "--batch_size", str(cfg.eval.batch_size), "--device", "cpu", "--output_path", str(out)],
            capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                             "HOME": str(Path.home())})
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]
        if task == "sweep_wikitext":
            assert ours["wikitext.word_perplexity"] == pytest.approx(results["word_perplexity,none"], rel=1e-4)
            assert ours["wikitext.bits_per_byte"] == pytest.approx(results["bits_per_byte,none"], rel=1e-4)
        else:
            assert ours["lambada.perplexity"] == pytest.approx(results["perplexity,none"], rel=1e-4)
            assert ours["lambada.acc"] == pytest.approx(results["acc,none"], abs=1e-9)
