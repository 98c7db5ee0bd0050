import os

# Never reach for a model hub in tests: a lookup without this hangs for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Hashes and the built SD tokenizer go to a per-session cache, never the user's ~/.cache.
import tempfile  # noqa: E402

import pytest  # noqa: E402

os.environ.setdefault("TI_FAST_CACHE", tempfile.mkdtemp(prefix="ti-fast-test-cache-"))


@pytest.fixture(scope="session")
def tiny_single(tmp_path_factory):
    """make_tiny(layout='single', seed=0), shared by the session: treat as read-only."""
    from ti_fast.loading import make_tiny
    return make_tiny(tmp_path_factory.mktemp("tiny_single"), "single", seed=0)


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """make_tiny(layout='diffusers', seed=0), shared by the session: treat as read-only."""
    from ti_fast.loading import make_tiny
    return make_tiny(tmp_path_factory.mktemp("tiny_diffusers"), "diffusers", seed=0)
