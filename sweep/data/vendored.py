"""The evaluation and calibration data vendored in sweep/data/, checked against their sha256 on use.

Provenance and licences: sweep/data/README.md.
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

DATA_DIR = Path(__file__).parent

CHECKSUMS: Dict[str, str] = {
    "wikitext-2-raw-v1.test.raw": "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
    "lambada_openai.test.jsonl": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    "lambada.development.plain.txt": "f5b0f1e38fcdad6a1cd3a17bee4b6932a28cd9c5f463ada970c61de0f8679f2f",
}

# A top-level WikiText heading (" = Title = "), not a sub-heading (" = = Sub = = ").
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


class DataIntegrityError(RuntimeError):
    pass


@lru_cache(maxsize=None)
def data_file(name: str) -> Path:
    """Path of a vendored file after checking its sha256 (once per process)."""
    path = DATA_DIR / name
    if not path.is_file():
        raise DataIntegrityError(f"vendored data file {path} is missing (a broken install?)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CHECKSUMS[name]:
        raise DataIntegrityError(f"{path} has sha256 {digest}, expected {CHECKSUMS[name]}")
    return path


def wikitext_documents() -> List[str]:
    """The 62 WikiText-2 test articles, each the lines from its heading to the next one.

    The same documents lm-eval's `wikitext` task reads from its document-level dataset.
    """
    docs: List[List[str]] = []
    for line in data_file("wikitext-2-raw-v1.test.raw").read_text(encoding="utf-8").split("\n"):
        if _ARTICLE_HEADING.match(line):
            docs.append([])
        if docs and line.strip():
            docs[-1].append(line)
    return ["\n".join(lines) + "\n" for lines in docs]


def wikitext_jsonl() -> str:
    """The articles as JSON lines with the field lm-eval's wikitext functions read (`page`)."""
    return "".join(json.dumps({"page": page}) + "\n" for page in wikitext_documents())


def write_wikitext_jsonl(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(wikitext_jsonl(), encoding="utf-8")
    tmp.replace(path)
    return path


@lru_cache(maxsize=None)
def evaluation_checksums() -> Dict[str, str]:
    """sha256 → name of every file the evaluation scores: the vendored test splits and the documents
    file lm-eval reads. A calibration source with one of these checksums is a test split."""
    return {CHECKSUMS["wikitext-2-raw-v1.test.raw"]: "the WikiText-2 test split",
            CHECKSUMS["lambada_openai.test.jsonl"]: "the LAMBADA test split",
            hashlib.sha256(wikitext_jsonl().encode("utf-8")).hexdigest(): "the WikiText-2 test documents lm-eval reads"}
