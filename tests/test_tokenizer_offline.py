"""The tokenizer, quiet and offline: no 77-token warning from ti-fast's own tokenizer instances (and
nothing changed in transformers' logging), and without a reachable hub a missing tokenizer fails
with the one-line error instead of retrying for minutes. No real network traffic: the hub is
pointed at local sockets."""
from __future__ import annotations

import http.server
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ti_fast.loading import tokenizer as T

ROOT = Path(__file__).resolve().parents[1]
WARNING = "Token indices sequence length is longer than the specified maximum"
LONG = " ".join(["a photo of a cat"] * 40)                   # 160 tokens


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _warnings_for(tok) -> list[str]:
    # The record comes from this logger; a handler on it sees it whatever transformers' settings.
    log = logging.getLogger("transformers.tokenization_utils_base")
    h = Records()
    log.addHandler(h)
    try:
        tok(LONG)["input_ids"]
    finally:
        log.removeHandler(h)
    return [m for m in h.messages if WARNING in m]


def test_no_77_token_warning_from_our_instances(tmp_path):
    from transformers import CLIPTokenizer
    from transformers.utils import logging as hf_logging
    d = T.write_tiny_tokenizer(tmp_path / "tok")
    verbosity = hf_logging.get_verbosity()
    plain = CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    assert _warnings_for(plain), "the instrument: transformers warns on a plain instance"
    ours = T.load_tokenizer_dir(d)
    assert len(ours(LONG)["input_ids"]) > 77 and not _warnings_for(ours)
    # only our instance is quiet: a new plain one still warns, and the global verbosity is untouched
    assert _warnings_for(CLIPTokenizer.from_pretrained(str(d), local_files_only=True))
    assert hf_logging.get_verbosity() == verbosity


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hub_probe_answered_refused_and_silent(monkeypatch):
    from huggingface_hub import constants
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()                                    # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert T.hub_answers(timeout=5)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")          # refused
        assert not T.hub_answers(timeout=5)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        assert not T.hub_answers(timeout=0.5)                                    # gives up at the deadline
    finally:
        server.shutdown()
        silent.close()


# A fresh interpreter with no HF cache, no ti-fast cache, no installed BPE file (clip/open_clip hidden)
# and HF_HUB_OFFLINE unset: the only way left is the hub, which does not answer.
CHILD = r"""
import sys
sys.modules["clip"] = None
sys.modules["open_clip"] = None
from ti_fast.cli import main
sys.exit(main(["create", "x", "--model", sys.argv[1], "--out", sys.argv[2]]))
"""


@pytest.mark.parametrize("hub", ["refused", "silent"])
def test_missing_tokenizer_fails_fast_without_network(tiny_single, tmp_path, hub):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").symlink_to(tiny_single / "model.safetensors")   # no tokenizer/ beside it
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = 9 if hub == "refused" else silent.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), TI_FAST_CACHE=str(tmp_path / "cache"),
               HF_ENDPOINT=f"http://127.0.0.1:{port}", TI_FAST_HUB_TIMEOUT="1", OMP_NUM_THREADS="1")
    try:
        # The timeout only guards against a hang (huggingface_hub's own retries take minutes).
        out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(tmp_path / "out")], capture_output=True,
                             text=True, env=env, timeout=60)
    finally:
        silent.close()
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("ti-fast: error: no CLIP tokenizer found") and out.stderr.count("\n") == 1
    assert "pip install --no-deps clip-anytorch" in out.stderr
    assert not (tmp_path / "out" / "x.pt").exists()
