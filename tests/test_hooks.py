"""The test hooks: an environment variable names a factory the run imports; unset, nothing."""

from __future__ import annotations

import pytest

from nougat_dist import hooks
from nougat_dist.errors import SetupError
from nougat_dist.ocr.model import MODEL_ENV, injected_model, model_source
from testing import fake_model, faults


def test_unset_is_the_product_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert hooks.from_env(MODEL_ENV) is None and injected_model() is None


def test_the_fake_model_comes_through_the_model_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODEL_ENV, fake_model.value("delay=0,delay_rank1=0.5"))
    source = model_source("/no/checkpoint/needed", full_precision=False)
    assert (source.model_id, source.dtype, source.cpu_threads) == ("fake", "none", False)
    assert source.load(1, None).delay == 0.5 and source.load(0, None).delay == 0.0


@pytest.mark.parametrize("value, says", [
    ("testing.fake_model", "expected module:callable"),
    ("testing.no_such_module:source", "cannot load testing.no_such_module:source"),
    ("testing.fake_model:no_such_factory", "cannot load"),
])
def test_a_bad_hook_is_a_setup_error_saying_what_to_do(monkeypatch, value, says) -> None:
    monkeypatch.setenv(MODEL_ENV, value)
    with pytest.raises(SetupError, match=says):
        injected_model()


def test_a_model_hook_must_make_a_model_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODEL_ENV, faults.value("commit:1"))  # makes a fault function instead
    with pytest.raises(SetupError, match="not a ModelSource"):
        injected_model()


def test_fault_points_count_per_process_and_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    kills = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append(sig))
    fault = faults.points("commit:2@1")
    for rank in (0, 1, 0, 1, 1):
        fault("commit", rank=rank)
        fault("manifest", rank=rank)
    assert len(kills) == 1  # the second commit on rank 1 only
