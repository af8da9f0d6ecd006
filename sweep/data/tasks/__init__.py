"""lm-eval task definitions over the vendored data.

`write_task_dir(dir)` writes a folder that lm-eval reads with `TaskManager(include_path=dir)`
or, from the shell, `lm_eval --include_path dir --tasks sweep_wikitext,sweep_lambada ...`:

    python -m sweep.data.tasks /tmp/sweep_tasks
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from sweep.data.vendored import CHECKSUMS, data_file, write_wikitext_jsonl
from sweep.infra.cache import cached_file

TASK_DIR = Path(__file__).parent
# Our task names in lm-eval, by the short names used in configs and metric names.
LM_EVAL_TASKS = {"wikitext": "sweep_wikitext", "lambada": "sweep_lambada"}
# The vendored file (sweep/data/) each task reads.
DATA_FILES = {"wikitext": "wikitext-2-raw-v1.test.raw", "lambada": "lambada_openai.test.jsonl"}


def write_task_dir(target: Path) -> Path:
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    data_dir = target / "data"
    data_dir.mkdir(exist_ok=True)
    # The prepared evaluation data is cached with a checksum: a corrupted copy is rebuilt, not scored.
    cached_file(data_dir / "wikitext-2-raw-v1.test.docs.jsonl", write_wikitext_jsonl,
                {"from": CHECKSUMS["wikitext-2-raw-v1.test.raw"]})
    cached_file(data_dir / "lambada_openai.test.jsonl",
                lambda tmp: shutil.copyfile(data_file("lambada_openai.test.jsonl"), tmp),
                {"from": CHECKSUMS["lambada_openai.test.jsonl"]})
    for yaml_file in TASK_DIR.glob("*.yaml"):
        _write_atomically(target / yaml_file.name, yaml_file.read_text().replace("__DATA__", str(data_dir)))
    _write_atomically(target / "utils.py", (TASK_DIR / "utils.py").read_text())
    return target


def _write_atomically(path: Path, text: str) -> None:
    """Parallel grid points (joblib, submitit) share this folder while lm-eval scans it: a file is
    never rewritten in place (a reader could see it empty), only replaced whole when it changed."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    out = write_task_dir(Path(sys.argv[1] if len(sys.argv) > 1 else "sweep_tasks"))
    print(f"lm-eval tasks {', '.join(LM_EVAL_TASKS.values())} written to {out}")
    print(f"  lm_eval --include_path {out} --tasks {','.join(LM_EVAL_TASKS.values())} --model hf --model_args pretrained=<dir>")
