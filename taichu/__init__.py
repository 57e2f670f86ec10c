"""taichu: the Zidong Taichu / WenLan / M6 model family in MindSpore and PyTorch.

Importing taichu imports neither framework; a backend is imported when a model is built.
"""
from taichu.api import build_model, load_model, save_model, state_dict, load_state_dict
from taichu.config import ConfigError, load_config
from taichu.families import num_parameters
from taichu.weights import CheckpointError

__version__ = "0.1.0"
__all__ = ["build_model", "load_model", "save_model", "state_dict", "load_state_dict",
           "load_config", "num_parameters", "ConfigError", "CheckpointError", "__version__"]
