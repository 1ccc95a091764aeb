"""GPT-Neo model package: config, plain-PyTorch model and HF-compatible checkpoint I/O.

Free of Prefect, MLflow and transformers, so training and serving code can import it anywhere.
"""

from .config import PRESETS, GPTNeoConfig
from .hf_io import load_pretrained, save_pretrained
from .model import GPTNeo

__all__ = ["GPTNeo", "GPTNeoConfig", "PRESETS", "save_pretrained", "load_pretrained"]
