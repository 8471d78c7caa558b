import pytest
import torch

from qcompiler.tools.data import calibration_batches, eval_windows, tokenize_text
from qcompiler.tools.models import shared_dir, text_path

needs_shared = pytest.mark.skipif(shared_dir() is None, reason="../shared (models and text) not found; CI provides it")

STREAM = torch.arange(100, 1100, dtype=torch.int64)  # 1000 distinct tokens


def test_eval_windows_shapes_and_drop_partial():
    windows = eval_windows(STREAM, None, 64)
    assert len(windows) == 1000 // 64
    assert all(w.shape == (1, 64) and w.dtype == torch.int64 for w in windows)
    assert torch.equal(torch.cat(windows, dim=1)[0], STREAM[: 15 * 64])


def test_eval_windows_n_tokens_limits_stream():
    windows = eval_windows(STREAM, 256, 64)
    assert len(windows) == 4
    assert windows[-1][0, -1].item() == STREAM[255].item()


def test_eval_windows_bos_consumes_ctx_minus_one():
    windows = eval_windows(STREAM, 300, 100, bos_id=1)
    assert len(windows) == 300 // 99
    assert all(w.shape == (1, 100) and w[0, 0].item() == 1 for w in windows)
    body = torch.cat([w[0, 1:] for w in windows])
    assert torch.equal(body, STREAM[: 3 * 99])


def test_eval_windows_short_stream_gives_none():
    assert eval_windows(STREAM[:10], None, 64) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_tokens": None, "ctx": 0}, "ctx"), ({"n_tokens": -5, "ctx": 8}, "n_tokens"),
     ({"n_tokens": None, "ctx": 1, "bos_id": 1}, "ctx")],
)
def test_eval_windows_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eval_windows(STREAM, **kwargs)


def test_eval_windows_rejects_2d_stream():
    with pytest.raises(ValueError, match="1-D"):
        eval_windows(STREAM.view(10, 100), None, 8)


def test_calibration_batches_shapes_and_contiguous_slices():
    batches = calibration_batches(STREAM, n_samples=16, seq_len=32, seed=3)
    assert len(batches) == 16
    for b in batches:
        assert b.shape == (1, 32) and b.dtype == torch.int64
        assert torch.equal(b[0], torch.arange(b[0, 0].item(), b[0, 0].item() + 32))  # a slice of the stream


def test_calibration_batches_seeded():
    a = calibration_batches(STREAM, n_samples=8, seq_len=32, seed=0)
    b = calibration_batches(STREAM, n_samples=8, seq_len=32, seed=0)
    c = calibration_batches(STREAM, n_samples=8, seq_len=32, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_calibration_batches_bos():
    batches = calibration_batches(STREAM, n_samples=4, seq_len=32, bos_id=1)
    assert all(b.shape == (1, 32) and b[0, 0].item() == 1 and b[0, 1].item() >= 100 for b in batches)


def test_calibration_batches_exact_length_stream():
    batches = calibration_batches(STREAM[:32], n_samples=3, seq_len=32)
    assert all(torch.equal(b[0], STREAM[:32]) for b in batches)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"seq_len": 2000}, "shorter than seq_len"), ({"n_samples": 0}, "n_samples"), ({"seq_len": 0}, "seq_len")],
)
def test_calibration_batches_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibration_batches(STREAM, **kwargs)


@needs_shared
def test_tokenize_text_stories260k():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_dir() / "models" / "stories260K")
    ids = tokenize_text(tok, "Once upon a time, there was a little cat.")
    assert ids.ndim == 1 and ids.dtype == torch.int64
    assert tok.bos_token_id not in ids.tolist()  # no special tokens added
    assert tok.decode(ids) == "Once upon a time, there was a little cat."


@needs_shared
def test_tokenize_tinystories_file():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_dir() / "models" / "stories260K")
    ids = tokenize_text(tok, text_path("tinystories").read_text(encoding="utf-8"))
    assert ids.numel() == 100_707  # whole file tokenized in one call
    assert 0 <= ids.min() and ids.max() < tok.vocab_size
