"""ti-fast: fast, lean textual-inversion training for Stable Diffusion 1.x.

    import ti_fast
    model = ti_fast.load_model("v1-5.safetensors")
    result = ti_fast.train(ti_fast.TrainConfig(name="mycat", data="my-cat", model="v1-5.safetensors"))
    ti_fast.generate(ti_fast.GenerateConfig(model="v1-5.safetensors", prompt="a photo of mycat",
                                            embeddings=["embeddings"]))
"""
__version__ = "0.1.0"

from .loading import load_model, make_tiny, ModelLoadError  # noqa: E402
from .training.config import (TrainConfig, TrainError, ConfigError, NonFiniteLossError,  # noqa: E402
                              OutOfMemoryError)
from .training.loop import train, TrainResult  # noqa: E402
from .sample.generate import generate, GenerateConfig, GenerateResult, GenerateError  # noqa: E402
from .hypernetworks import read_hypernetwork as load_hypernetwork, Hypernetwork, HypernetworkError  # noqa: E402

__all__ = ["load_model", "make_tiny", "ModelLoadError", "train", "TrainConfig", "TrainResult", "TrainError",
           "ConfigError", "NonFiniteLossError", "OutOfMemoryError", "generate", "GenerateConfig",
           "GenerateResult", "GenerateError", "load_hypernetwork", "Hypernetwork", "HypernetworkError"]

from .preprocess import preprocess, PreprocessConfig, PreprocessResult  # noqa: E402
__all__ += ["preprocess", "PreprocessConfig", "PreprocessResult"]
