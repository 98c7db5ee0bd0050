"""The CLIP tokenizer: build it from OpenAI's BPE file, generate the tiny one, find one for a model.

CLIP's vocabulary (OpenAI clip/simple_tokenizer.py, mirrored by HF vocab.json):
  ids 0..255     the 256 byte-level unicode characters (GPT-2's bytes_to_unicode order)
  ids 256..511   the same characters with `</w>` (end of word)
  then one token per BPE merge, in merge order
  then <|startoftext|>, <|endoftext|> (49406 / 49407 for SD's tokenizer).
transformers' CLIPTokenizer loads vocab.json + merges.txt (+ tokenizer_config.json for
model_max_length 77). It silently builds a 2-token tokenizer from missing or misnamed files,
so every path here checks the vocabulary size.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

from ..fsutil import atomic_write_text
from .errors import ModelLoadError
from .files import cache_dir

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SD_VOCAB_SIZE = 49408
SD_NUM_MERGES = 49152 - 256 - 2            # 48894: OpenAI keeps this many lines of the file
HF_CLIP_REPO = "openai/clip-vit-large-patch14"
# transformers' per-instance "already warned" key for the over-long sequence warning.
LONG_SEQUENCE_WARNING = "sequence-length-is-longer-than-the-specified-maximum"
# Seconds to wait for the hub before calling it unreachable ($TI_FAST_HUB_TIMEOUT overrides).
HUB_TIMEOUT_S = 2.0

# Words the tiny tokenizer learns as single tokens: prompt vocabulary used by tests, templates
# (A1111's "a photo of a [name]", "a painting in the style of [name]") and ordinary English.
TINY_WORDS = """
a an the of in on at by with and or for to from is are be this that it its my your his her
their one two three photo photograph picture image painting drawing sketch render art artwork
style styled artist portrait landscape close up dark bright small large big little clean dirty
cropped weird nice good cool beautiful rendition illustration cat dog man woman person face
house tree car city street sky sun moon water sea mountain flower red blue green yellow black
white orange purple gray brown old new young happy sad detailed highly realistic oil canvas
digital concept sculpture statue toy object thing same similar like made inspired by
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character map (256 entries, fixed order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _vocab_from_merges(merges: list[tuple[str, str]]) -> list[str]:
    base = list(bytes_to_unicode().values())
    return base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]


def write_tokenizer(out_dir, merges: list[tuple[str, str]]) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    out = Path(out_dir)
    vocab = _vocab_from_merges(merges)
    ids = {tok: i for i, tok in enumerate(vocab)}
    if len(ids) != len(vocab):
        raise ValueError("duplicate tokens in BPE vocabulary")
    atomic_write_text(out / "vocab.json", json.dumps(ids, ensure_ascii=False))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
           "errors": "replace", "add_prefix_space": False, **specials}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2))
    atomic_write_text(out / "special_tokens_map.json", json.dumps(specials, indent=2))
    return out


def read_bpe_merges(bpe_gz_path, n: int = SD_NUM_MERGES) -> list[tuple[str, str]]:
    """Merges of OpenAI's bpe_simple_vocab_16e6.txt.gz: line 0 is a header, then `a b` lines."""
    lines = gzip.open(bpe_gz_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:n + 1]]
    if len(merges) != n or any(len(m) != 2 for m in merges):
        raise ModelLoadError(f"{Path(bpe_gz_path).name}: not a CLIP BPE merges file ({len(merges)} usable merges, need {n})")
    return merges


def build_tokenizer_from_bpe(bpe_gz_path, out_dir) -> Path:
    """SD's tokenizer (49408 tokens) as vocab.json/merges.txt from OpenAI's BPE file."""
    return write_tokenizer(out_dir, read_bpe_merges(bpe_gz_path))


def learn_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE over `words` (each weight 1) until every word is one token.
    Ties break on the pair's text, so the result is deterministic. Words are split as CLIP
    applies merges: characters, the last one carrying `</w>`."""
    enc = bytes_to_unicode()
    seqs = []
    for w in sorted(set(words)):
        chars = [enc[b] for b in w.lower().encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + "</w>"])
    merges = []
    while True:
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = "".join(best)
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out


@functools.lru_cache(maxsize=1)
def tiny_merges() -> tuple:
    return tuple(learn_bpe(TINY_WORDS))


def write_tiny_tokenizer(out_dir) -> Path:
    """The project's tiny tokenizer (819 tokens = tiny.TINY_VOCAB_SIZE), for tiny test models."""
    return write_tokenizer(out_dir, list(tiny_merges()))


def _check(tok, source: str, min_size: int):
    """Force SD's conventions and refuse the silent 2-token tokenizer."""
    if len(tok) < min_size or tok.convert_tokens_to_ids(EOS) != len(tok) - 1:
        raise ModelLoadError(f"tokenizer from {source} has {len(tok)} tokens (need >= {min_size}, "
                             f"{EOS} last): missing or broken vocab.json/merges.txt")
    tok.model_max_length = 77
    tok.pad_token = EOS
    # ti-fast tokenizes whole prompts and cuts them into 75-token chunks itself, so transformers'
    # "Token indices sequence length is longer than ... (N > 77)" warning is wrong here. It is
    # silenced on this instance only (the flag transformers sets after warning once), not through
    # transformers' process-wide logging.
    tok.deprecation_warnings[LONG_SEQUENCE_WARNING] = True
    return tok


def load_tokenizer_dir(path, min_size: int = 512 + 2):
    """A CLIPTokenizer from a folder with vocab.json + merges.txt."""
    from transformers import CLIPTokenizer
    path = Path(path)
    if not (path / "vocab.json").is_file() or not (path / "merges.txt").is_file():
        raise ModelLoadError(f"{path}: no vocab.json + merges.txt in this tokenizer folder")
    try:
        tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:   # transformers/tokenizers raise many kinds on damaged files
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ModelLoadError(f"{path}: not a usable CLIP tokenizer ({type(e).__name__}: {first}); "
                             "pass a folder with a valid vocab.json + merges.txt") from None
    return _check(tok, str(path), min_size)


def find_bpe_file() -> Path | None:
    """OpenAI's BPE file inside an installed clip-anytorch or open_clip (not imported)."""
    for pkg in ("clip", "open_clip"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            f = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
            if f.is_file():
                return f
    return None


def _build_once(bpe: Path, built: Path) -> None:
    """Build into a private folder, then rename it into place: a concurrent reader never sees
    half a tokenizer, and when two processes race the second one's copy is simply dropped."""
    tmp = built.with_name(f".{built.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tokenizer_from_bpe(bpe, tmp)
    try:
        os.replace(tmp, built)
    except OSError:                       # already built by someone else (non-empty target)
        shutil.rmtree(tmp, ignore_errors=True)


def hub_answers(timeout: float | None = None) -> bool:
    """Whether the Hugging Face hub ($HF_ENDPOINT) answers a HEAD request for the tokenizer's
    vocab.json within `timeout` seconds. Without a network, huggingface_hub's own lookups retry
    for minutes (a DNS lookup that hangs is bounded by no socket timeout), so the probe runs on a
    daemon thread and we stop waiting at the deadline. Any HTTP answer counts: the hub is there."""
    import urllib.error
    import urllib.request
    from huggingface_hub import constants
    if timeout is None:
        try:
            timeout = float(os.environ.get("TI_FAST_HUB_TIMEOUT", HUB_TIMEOUT_S))
        except ValueError:
            timeout = HUB_TIMEOUT_S
    url = f"{constants.ENDPOINT.rstrip('/')}/{HF_CLIP_REPO}/resolve/main/vocab.json"
    answered: list[bool] = []

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None                    # a 3xx is an answer; following it could hang again

    def probe():
        try:
            opener = urllib.request.build_opener(NoRedirect)
            with opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except Exception:                  # refused, unresolvable, timed out, bad URL
            answered.append(False)

    th = threading.Thread(target=probe, name="ti-fast-hub-probe", daemon=True)
    th.start()
    th.join(timeout)
    return bool(answered and answered[0])


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0", "false", "False")


def _hf_cache_folder() -> Path | None:
    """The local HF cache's snapshot folder holding HF_CLIP_REPO's vocab.json and merges.txt, found
    on disk only: transformers' own local_files_only lookup still builds hub request headers, for
    which huggingface_hub fetches a registry from the hub (seconds lost without a network)."""
    from huggingface_hub import try_to_load_from_cache
    found = [try_to_load_from_cache(HF_CLIP_REPO, name) for name in ("vocab.json", "merges.txt")]
    if all(isinstance(p, str) for p in found) and Path(found[0]).parent == Path(found[1]).parent:
        return Path(found[0]).parent
    return None


def tokenizer_folder(model_dir=None, tokenizer=None) -> tuple[Path, str] | None:
    """The local folder (vocab.json + merges.txt) of SD's tokenizer, and its source's name: an
    explicit `tokenizer` folder, the model's own tokenizer/ folder, the local HF cache of
    openai/clip-vit-large-patch14, or OpenAI's BPE file from an installed clip-anytorch/open_clip
    (built once into the ti-fast cache). None: only a download could provide one."""
    if tokenizer is not None:
        return Path(tokenizer), str(tokenizer)
    if model_dir is not None and (Path(model_dir) / "tokenizer" / "vocab.json").is_file():
        return Path(model_dir) / "tokenizer", str(Path(model_dir) / "tokenizer")
    cached = _hf_cache_folder()
    if cached is not None:
        return cached, f"hf-cache:{HF_CLIP_REPO}"
    built = cache_dir() / "tokenizer"
    if not (built / "vocab.json").is_file():
        bpe = find_bpe_file()
        if bpe is None:
            return None
        _build_once(bpe, built)
    return built, str(built)


def resolve_tokenizer(model_dir=None, tokenizer=None, min_size: int = SD_VOCAB_SIZE):
    """Find SD's tokenizer: tokenizer_folder's, else a download when online; else a
    ModelLoadError saying how to provide one. Returns (tokenizer, source)."""
    found = tokenizer_folder(model_dir, tokenizer)
    if found is not None:
        return load_tokenizer_dir(found[0], min_size), found[1]
    if not _offline() and hub_answers():
        from transformers import CLIPTokenizer
        try:
            tok = CLIPTokenizer.from_pretrained(HF_CLIP_REPO)
            return _check(tok, HF_CLIP_REPO, min_size), f"hub:{HF_CLIP_REPO}"
        except (OSError, ValueError):
            pass
    raise ModelLoadError("no CLIP tokenizer found (and no hub to download it from): pass --tokenizer DIR "
                         "(vocab.json + merges.txt), or `pip install --no-deps clip-anytorch` (ships OpenAI's "
                         f"BPE file, 1.4 MB), or download {HF_CLIP_REPO} into the HF cache")


def tokenizer_for(tokenizer, model_dir, rows: int, where):
    """The tokenizer of a model whose token table has `rows` rows: a ready CLIPTokenizer as given,
    else resolve_tokenizer (the SD size needed when the table has SD's rows). Refuses one with
    more tokens than the table has rows. Returns (tokenizer, source)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        tok, src = tokenizer, type(tokenizer).__name__           # a ready CLIPTokenizer
    else:
        tok, src = resolve_tokenizer(model_dir, tokenizer, min_size=SD_VOCAB_SIZE if rows >= SD_VOCAB_SIZE else 514)
    if len(tok) > rows:
        raise ModelLoadError(f"{Path(where).name}: tokenizer from {src} has {len(tok)} tokens but the text "
                             f"encoder's table has {rows} rows: pass the model's own tokenizer (--tokenizer DIR)")
    return tok, src


def clip_token_ids(folder, text: str, min_size: int = 512 + 2) -> tuple[list[int], int]:
    """(ids of `text` without BOS/EOS, vocabulary size) from a tokenizer folder, with the
    `tokenizers` library alone: the very BPE that transformers' CLIPTokenizer wraps (same model,
    normaliser and pre-tokeniser, tests/test_tokenizer.py compares them), without importing
    transformers (over a second), for `ti-fast create`, which tokenizes one init text."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    folder = Path(folder)
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(ln.split()) for ln in lines if ln.strip() and not ln.startswith("#version")]
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ModelLoadError(f"{folder}: not a usable CLIP tokenizer ({type(e).__name__}: {first}); "
                             "pass a folder with a valid vocab.json + merges.txt") from None
    if len(vocab) < min_size or vocab.get(EOS) != len(vocab) - 1:
        raise ModelLoadError(f"tokenizer from {folder} has {len(vocab)} tokens (need >= {min_size}, "
                             f"{EOS} last): missing or broken vocab.json/merges.txt")
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok.encode(text, add_special_tokens=False).ids, len(vocab)
