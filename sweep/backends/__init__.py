"""Adapters to third-party quantization libraries (GPTQModel, auto-round, bitsandbytes, hqq, optimum-quanto, aqlm).

Each is imported only when a run uses it, so the package stays importable on machines
(CPU CI) where those libraries are not installed; `require()` turns a missing library into
an error that says what to install.
"""
from __future__ import annotations

import importlib
import importlib.util

INSTALL_HINT = {
    "gptqmodel": "pip install 'gptqmodel>=7.6' (GPU machines; see README, GPU backends)",
    "auto_round": "pip install 'auto-round>=0.16'",
    "bitsandbytes": "pip install 'bitsandbytes>=0.45'",
    # CPU and GPU: the `quant` extra (also in `test`) pins the versions tested here.
    "hqq": "pip install -e '.[quant]' (hqq==0.2.8.post1)",
    "optimum.quanto": "pip install -e '.[quant]' (optimum-quanto==0.2.7)",
    "aqlm": "pip install -e '.[quant]' (aqlm==1.1.7)",
}


class BackendUnavailable(RuntimeError):
    pass


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing (optimum.quanto)
        return False


def install_hint(module: str) -> str:
    return INSTALL_HINT.get(module, "pip install " + module)


def require(module: str):
    if not available(module):
        raise BackendUnavailable(f"{module} is not installed: {install_hint(module)}")
    return importlib.import_module(module)


def cuda_backend_errors(setting: str, cfg, module: str, library: str, instead: str = "") -> list:
    """The two ways a CUDA-only library backend cannot run, as config errors (before any model load).

    `setting` names what chose the backend (`method=bnb`, `method.backend='gptqmodel'`); `instead`
    says what to use instead, if anything."""
    errors = []
    if cfg.device == "cpu":
        errors.append(f"{setting} is not allowed with device=cpu: sweep runs {library} on CUDA only{instead}")
    if not available(module):
        errors.append(f"{setting} needs {library}, which is not installed: {INSTALL_HINT[module]}{instead}")
    return errors
