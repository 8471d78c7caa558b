import math
import time
from types import SimpleNamespace

import pytest
import torch

from qcompiler.tools.data import eval_windows, tokenize_text
from qcompiler.tools.evaluate import accepts_logits_to_keep, paired_prefill, perplexity, prefill_tokens_per_s
from qcompiler.tools.models import load_model, shared_dir, text_path

needs_shared = pytest.mark.skipif(shared_dir() is None, reason="../shared (models and text) not found; CI provides it")

VOCAB = 16


class UniformLM:
    """Equal logits for every token: perplexity is exactly the vocabulary size."""

    def __call__(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


class OracleLM:
    """Puts almost all mass on the true next token (its input shifted by one); counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids):
        self.calls += 1
        logits = torch.full((*input_ids.shape, VOCAB), -1e4)
        nxt = torch.roll(input_ids, -1, dims=1)
        logits.scatter_(-1, nxt.unsqueeze(-1), 0.0)
        return SimpleNamespace(logits=logits)


def test_perplexity_uniform_is_vocab_size():
    windows = eval_windows(torch.randint(0, VOCAB, (200,)), None, 32, bos_id=1)
    assert perplexity(UniformLM(), windows, progress=False) == pytest.approx(VOCAB, rel=1e-12)


def test_perplexity_oracle_is_one_and_skips_bos_target():
    model = OracleLM()
    windows = eval_windows(torch.randint(2, VOCAB, (200,)), None, 32, bos_id=1)
    assert perplexity(model, windows, progress=False) == pytest.approx(1.0)
    assert model.calls == len(windows)


def test_perplexity_counts_every_predicted_token():
    # Two windows whose NLLs differ: ppl must weight them by their number of predicted tokens.
    class HalfLM:
        def __call__(self, input_ids):
            # uniform over 2 of VOCAB tokens for every position: NLL log 2 when target in {0, 1}
            logits = torch.full((*input_ids.shape, VOCAB), -1e4)
            logits[..., :2] = 0.0
            return SimpleNamespace(logits=logits)

    windows = [torch.tensor([[0, 1, 0, 1]]), torch.tensor([[1, 0]])]
    assert perplexity(HalfLM(), windows, progress=False) == pytest.approx(2.0)


@pytest.mark.parametrize("windows, match", [([], "empty"), ([torch.tensor([[3]])], "shape"),
                                            ([torch.tensor([1, 2, 3])], "shape")])
def test_perplexity_bad_windows(windows, match):
    with pytest.raises(ValueError, match=match):
        perplexity(UniformLM(), windows, progress=False)


def test_prefill_tokens_per_s_positive():
    tps = prefill_tokens_per_s(UniformLM(), 64, vocab_size=VOCAB, repeats=2, warmup=0)
    assert tps > 0 and math.isfinite(tps)


class SlowLM(torch.nn.Module):
    """Sleeps ``delay`` seconds per forward and records the order of the calls in ``log``."""

    def __init__(self, delay, log, name):
        super().__init__()
        self.delay, self.log, self.name = delay, log, name

    def forward(self, input_ids, logits_to_keep=None):
        self.log.append(self.name)
        time.sleep(self.delay)
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_paired_prefill_alternates_the_two_models_and_takes_the_median_ratio():
    log = []
    speed, speedup, low, high, rounds = paired_prefill(SlowLM(0.02, log, "base"), SlowLM(0.01, log, "model"), 16, vocab_size=VOCAB,
                                    repeats=3, warmup=1, min_seconds=0.0)
    assert log == ["base", "model"] * 4 and rounds == 3
    assert low <= speedup <= high and 1.5 < low and high < 2.5     # sleeps of 20 ms / 10 ms: ratios near 2
    log.clear()     # short rounds: as many as fill min_seconds (0.03 s a round -> 0.3 s: 10 or so)
    speed, speedup, *_ = paired_prefill(SlowLM(0.02, log, "base"), SlowLM(0.01, log, "model"), 16,
                                        vocab_size=VOCAB, repeats=3, warmup=1, min_seconds=0.3)
    assert 2 * 6 <= len(log) <= 2 * 11 and log == ["base", "model"] * (len(log) // 2)
    assert 1.5 < speedup < 2.5 and 16 / 0.02 < speed < 16 / 0.005
    with pytest.raises(ValueError, match="repeats"):
        paired_prefill(UniformLM(), UniformLM(), 8, vocab_size=VOCAB, repeats=0)


class RecordingLM(torch.nn.Module):
    """Records the ``logits_to_keep`` each forward got (None: not passed)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, input_ids, logits_to_keep=None):
        self.seen.append(logits_to_keep)
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_prefill_scores_only_the_last_position_like_generate():
    model = RecordingLM()
    prefill_tokens_per_s(model, 16, vocab_size=VOCAB, repeats=2, warmup=1)
    assert model.seen == [1, 1, 1]
    prefill_tokens_per_s(model, 16, vocab_size=VOCAB, repeats=1, warmup=0, last_logits_only=False)
    assert model.seen[-1] is None


def test_logits_to_keep_is_found_through_torch_compile():
    model = RecordingLM()
    assert accepts_logits_to_keep(model) and accepts_logits_to_keep(torch.compile(model))
    assert not accepts_logits_to_keep(UniformLM())


@pytest.mark.parametrize("kwargs, match", [({"seq_len": 0}, "seq_len"), ({"repeats": 0}, "repeats"),
                                           ({"warmup": -1}, "warmup"), ({"vocab_size": 0}, "vocab_size")])
def test_prefill_tokens_per_s_bad_args(kwargs, match):
    args = {"seq_len": 8, "vocab_size": VOCAB} | kwargs
    with pytest.raises(ValueError, match=match):
        prefill_tokens_per_s(UniformLM(), **args)


@pytest.fixture(scope="module")
def stories():
    model, tok = load_model("stories260K")
    ids = tokenize_text(tok, text_path("tinystories").read_text(encoding="utf-8"))
    return model, tok, ids


@needs_shared
def test_stories260k_perplexity_first_8_windows(stories):
    model, tok, ids = stories
    windows = eval_windows(ids, None, 512, bos_id=tok.bos_token_id)[:8]
    ppl = perplexity(model, windows, progress=False)
    assert ppl == pytest.approx(4.673, abs=0.01)  # measured: 4.6728 (fp32, CPU)


@needs_shared
def test_stories260k_prefill(stories):
    model, _, _ = stories
    assert prefill_tokens_per_s(model, 128, vocab_size=model.config.vocab_size, repeats=2) > 0
