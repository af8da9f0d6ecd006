"""Calibration as a sweep axis: self-generated text, the cache that makes a grid generate once, the guard
against calibrating on a test split, and sources × sizes as grid dimensions with distinct fingerprints."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, make_config
from sweep.config.schema import ConfigError
from sweep.data import calibration, self_generated
from sweep.data.vendored import DATA_DIR, write_wikitext_jsonl
from sweep.models.loading import load_model, model_fingerprint

SMALL = ["model=smollm2-135m-4l", "calibration=self_generated", "calibration.nsamples=5", "calibration.seqlen=24",
         "calibration.generation.batch_size=2"]


@pytest.fixture(scope="module")
def small_model(embedded_model_dir):
    cfg = make_config(*SMALL)
    model, tokenizer = load_model(cfg.model, "cpu", cfg.cache_dir)
    return cfg, model, tokenizer


def test_self_generated_text_is_reproducible_for_a_seed_and_differs_across_seeds(small_model):
    cfg, model, tokenizer = small_model
    cal = cfg.calibration
    first = self_generated.generate_windows(model, tokenizer, cal.nsamples, cal.seqlen, cal.generation, seed=0)
    again = self_generated.generate_windows(model, tokenizer, cal.nsamples, cal.seqlen, cal.generation, seed=0)
    other = self_generated.generate_windows(model, tokenizer, cal.nsamples, cal.seqlen, cal.generation, seed=1)
    assert first.shape == (5, 24) and torch.equal(first, again) and not torch.equal(first, other)
    assert (first[:, 0] == tokenizer.bos_token_id).all()   # every window starts from BOS, as configured
    assert len({tuple(row[1:].tolist()) for row in first}) == 5  # five different samples, not one repeated


def test_openings_rotate_and_a_chat_prompt_starts_every_sample(small_model):
    cfg, model, tokenizer = small_model
    gen = cfg.calibration.generation
    starts = self_generated.start_ids(tokenizer, type(gen)(openings=["", "The"]))
    windows = self_generated.generate_windows(model, tokenizer, 4, 16, type(gen)(openings=["", "The"], batch_size=2), 0)
    for k, row in enumerate(windows):
        assert row[:len(starts[k % 2])].tolist() == starts[k % 2]
    chat = self_generated.start_ids(tokenizer, type(gen)(chat_prompt="Write about the sea."))
    assert len(chat) == 1 and len(chat[0]) > 5


def test_the_cache_makes_a_grid_generate_once(small_model, tmp_path, monkeypatch):
    cfg, model, tokenizer = small_model
    calls = []
    real = self_generated.generate_windows

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(self_generated, "generate_windows", counting)
    fingerprint = model_fingerprint(cfg.model, cfg.cache_dir, "cpu")
    first = calibration.cached_samples(tokenizer, cfg.calibration, tmp_path, model=model, model_fingerprint=fingerprint)
    second = calibration.cached_samples(tokenizer, cfg.calibration, tmp_path, model=model, model_fingerprint=fingerprint)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, second))
    # Another seed is another entry.
    reseeded = make_config(*SMALL, "seed=3").calibration
    calibration.cached_samples(tokenizer, reseeded, tmp_path, model=model, model_fingerprint=fingerprint)
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["wikitext-2-raw-v1.test.raw", "lambada_openai.test.jsonl", "docs"])
def test_calibrating_on_a_test_split_the_sweep_evaluates_on_is_refused(name, tmp_path):
    path = write_wikitext_jsonl(tmp_path / "copy.jsonl") if name == "docs" else tmp_path / f"renamed-{name}.txt"
    if name != "docs":
        path.write_bytes((DATA_DIR / name).read_bytes())  # a copy elsewhere: the content, not the path, decides
    with pytest.raises(ConfigError, match="calibration.source=.*which sweep evaluates on"):
        make_config(f"calibration.source={path}")


def test_sources_and_sizes_are_grid_dimensions_with_distinct_fingerprints(tmp_path, embedded_model_dir):
    cmd = [sys.executable, "-m", "sweep", "model=smollm2-135m-4l", "method=gptq", "bits=4",
           "calibration=lambada_dev,self_generated", "calibration.nsamples=2,4", "calibration.seqlen=32",
           "eval.tasks=[lambada]", "eval.limit.lambada=4", "bench=none", "baseline=false",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/a",
           f"hydra.sweep.dir={tmp_path}/grid", "-m"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("smollm2-135m-4l")
    runs = client.search_runs([exp.experiment_id], "tags.`sweep.role` = 'point'")
    seen = {(r.data.tags["calibration.source"], r.data.tags["calibration.tokens"]): r.data.tags["calibration.fingerprint"]
            for r in runs}
    assert set(seen) == {(s, str(n * 32)) for s in ("lambada_dev", "self_generated") for n in (2, 4)}
    assert len(set(seen.values())) == 4
    summary = (tmp_path / "grid" / "summary.md").read_text()
    assert "self_generated×64" in summary and "lambada_dev×128" in summary
