"""taichu: the Zidong Taichu / WenLan / M6 model family in MindSpore and PyTorch.

Importing taichu imports neither framework (a backend is imported when a model is built)
nor anything else heavy: the names below load on first use, so the ONNX runtime side
(export.OnnxGenerator) runs with numpy, onnxruntime and sentencepiece alone.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {"build_model": "taichu.api", "load_model": "taichu.api", "save_model": "taichu.api",
         "state_dict": "taichu.api", "load_state_dict": "taichu.api",
         "load_config": "taichu.config", "ConfigError": "taichu.config",
         "num_parameters": "taichu.families", "CheckpointError": "taichu.weights"}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'taichu' has no attribute {name!r}")
