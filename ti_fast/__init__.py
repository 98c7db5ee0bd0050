"""ti-fast: fast, lean textual-inversion training for Stable Diffusion 1.x."""
__version__ = "0.1.0"
from .loading import load_model, make_tiny, ModelLoadError  # noqa: E402,F401
