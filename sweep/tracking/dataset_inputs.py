"""The data a grid point reads, as MLflow dataset inputs: name, split, sha256, how much of it was used.

MLflow shows them in the runs table's Datasets column and on the run page, and two runs scored
on different data are told apart by the digest. The digest is the first 16 hex digits of the
file's sha256 (MLflow stores at most 36 characters); the full sha256 is in the profile.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from sweep.config.schema import SweepConfig
from sweep.data.vendored import CHECKSUMS, data_file

CONTEXT_TAG = "mlflow.data.context"
# Evaluation task → (dataset name, vendored file, split).
EVAL_FILES = {
    "wikitext": ("wikitext-2-raw-v1", "wikitext-2-raw-v1.test.raw", "test"),
    "lambada": ("lambada_openai", "lambada_openai.test.jsonl", "test"),
}
CALIBRATION_FILES = {"lambada_dev": ("lambada", "lambada.development.plain.txt", "development")}


def dataset_inputs(cfg: SweepConfig, needs_calibration: bool) -> List:
    """DatasetInput entities for the evaluation tasks (context `eval`) and the calibration text (`calibration`)."""
    inputs = []
    for task in cfg.eval.tasks:
        name, file, split = EVAL_FILES[task]
        data_file(file)  # verifies the checksum
        inputs.append(_input(name, split, f"sweep/data/{file}", CHECKSUMS[file], "eval",
                             {"task": task, "limit": cfg.eval.limit.get(task)}))
    if needs_calibration:
        inputs.append(_calibration_input(cfg))
    return inputs


def _calibration_input(cfg: SweepConfig):
    src = cfg.calibration.source
    used = {"nsamples": cfg.calibration.nsamples, "seqlen": cfg.calibration.seqlen, "seed": cfg.calibration.seed}
    if src in CALIBRATION_FILES:
        name, file, split = CALIBRATION_FILES[src]
        data_file(file)
        return _input(name, split, f"sweep/data/{file}", CHECKSUMS[file], "calibration", used)
    if src.startswith("hub:"):  # the content is not hashed here: the digest names the id only
        return _input(src[4:], "train", src, None, "calibration", used, source_type="hub")
    if src == "self_generated":  # written by the model itself: named by the model and the sampling settings
        settings = json.dumps({"model": cfg.model.path, **asdict(cfg.calibration.generation)}, sort_keys=True)
        return _input("self_generated", "", f"model:{cfg.model.path}", hashlib.sha256(settings.encode()).hexdigest(),
                      "calibration", {**used, **asdict(cfg.calibration.generation)}, source_type="model")
    path = Path(src).expanduser().resolve()
    return _input(path.name, "", str(path), hashlib.sha256(path.read_bytes()).hexdigest(), "calibration", used)


def _input(name: str, split: str, source: str, sha256: Optional[str], context: str, used: dict,
           source_type: str = "local"):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = (sha256 or hashlib.sha256(source.encode()).hexdigest())[:16]
    profile = {"sha256": sha256, "split": split, **used}
    dataset = Dataset(name=f"{name}/{split}" if split else name, digest=digest, source_type=source_type,
                      source=json.dumps({"uri": source}), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, context)])
