"""ti-fast: fast, lean textual-inversion training for Stable Diffusion 1.x.

    import ti_fast
    model = ti_fast.load_model("v1-5.safetensors")
    result = ti_fast.train(ti_fast.TrainConfig(name="mycat", data="my-cat", model="v1-5.safetensors"))
    ti_fast.generate(ti_fast.GenerateConfig(model="v1-5.safetensors", prompt="a photo of mycat",
                                            embeddings=["embeddings"]))

The names below are imported on first use (PEP 562), so `import ti_fast` — and `ti-fast --help`,
which imports ti_fast.cli through this package — costs no torch import.
"""
import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_model": "ti_fast.loading", "make_tiny": "ti_fast.loading", "ModelLoadError": "ti_fast.loading",
    "TrainConfig": "ti_fast.training.config", "TrainError": "ti_fast.training.config",
    "ConfigError": "ti_fast.training.config", "NonFiniteLossError": "ti_fast.training.config",
    "OutOfMemoryError": "ti_fast.training.config",
    "train": "ti_fast.training.loop", "TrainResult": "ti_fast.training.loop",
    "train_many": "ti_fast.training.group", "TrainGroup": "ti_fast.training.group",
    "generate": "ti_fast.sample.generate", "GenerateConfig": "ti_fast.sample.generate",
    "GenerateResult": "ti_fast.sample.generate", "GenerateError": "ti_fast.sample.generate",
    "load_hypernetwork": "ti_fast.hypernetworks", "Hypernetwork": "ti_fast.hypernetworks",
    "HypernetworkError": "ti_fast.hypernetworks",
    "preprocess": "ti_fast.preprocessing", "PreprocessConfig": "ti_fast.preprocessing",
    "PreprocessResult": "ti_fast.preprocessing",
    "UserError": "ti_fast.errors", "RunCrashed": "ti_fast.errors",
}

__all__ = ["load_model", "make_tiny", "ModelLoadError", "train", "train_many", "TrainGroup", "TrainConfig",
           "TrainResult", "TrainError",
           "ConfigError", "NonFiniteLossError", "OutOfMemoryError", "generate", "GenerateConfig",
           "GenerateResult", "GenerateError", "load_hypernetwork", "Hypernetwork", "HypernetworkError",
           "preprocess", "PreprocessConfig", "PreprocessResult", "UserError", "RunCrashed"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ti_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
