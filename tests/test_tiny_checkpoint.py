"""Tests for testing.tiny_checkpoint: the checkpoint must go through nougat's real
loading path (get_checkpoint, NougatModel.from_pretrained, inference) offline."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from nougat import NougatModel
from nougat.utils import checkpoint as nougat_checkpoint
from testing.tiny_checkpoint import (
    CHECKPOINT_FILES,
    FORMAT_VERSION,
    MARKER_KEY,
    build_tiny_checkpoint,
    main,
    read_tiny_checkpoint_params,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def tiny_dir(tiny_checkpoint: Path) -> Path:
    """The session's seed-0 checkpoint (built by conftest's ``tiny_checkpoint``)."""
    return tiny_checkpoint


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail on any attempt by nougat to download a checkpoint.

    nougat's postprocessing also calls nltk.download("words") whenever the corpus
    is missing; make that a no-op so inference never touches the network.
    """

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected checkpoint download {args} {kwargs}")

    monkeypatch.setattr(nougat_checkpoint, "download_checkpoint", no_download)
    import nltk

    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: False)


def _page(variant: int) -> Image.Image:
    """A letter-sized synthetic page; the two variants have different layouts."""
    image = Image.new("RGB", (612, 792), "white")
    draw = ImageDraw.Draw(image)
    if variant == 0:
        draw.text((60, 50), "A Title For Page One", fill="black")
        for line in range(40):
            draw.text((60, 80 + 15 * line), f"line {line} of some body text " * 3, fill="black")
        draw.rectangle([100, 700, 300, 760], outline="black", width=2)
    else:
        draw.ellipse([150, 100, 450, 400], outline="black", width=6)
        draw.rectangle([80, 450, 530, 500], fill="black")
        for line in range(8):
            draw.text((80, 530 + 25 * line), "completely different words", fill="black")
    return image


def test_files_and_get_checkpoint_does_not_download(tiny_dir: Path) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(CHECKPOINT_FILES)
    assert nougat_checkpoint.get_checkpoint(tiny_dir, download=True) == tiny_dir
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["max_length"] == config["max_position_embeddings"] == 96
    params = read_tiny_checkpoint_params(tiny_dir)
    assert params == {"format_version": FORMAT_VERSION, "seed": 0, "max_length": 96}
    # No absolute path baked in: the tokenizer is found relative to the load dir.
    assert str(tiny_dir.parent) not in (tiny_dir / "config.json").read_text()


def test_copied_checkpoint_loads_and_gives_page_dependent_text(
    tiny_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(tiny_dir, copy)
    model = NougatModel.from_pretrained(copy).eval()
    assert model.config.name_or_path == str(copy)
    assert len(model.decoder.tokenizer) == 260

    images = torch.stack(
        [model.encoder.prepare_input(_page(variant), random_padding=False) for variant in (0, 1)]
    )
    with torch.no_grad():
        output = model.inference(image_tensors=images)
    predictions = output["predictions"]
    assert len(predictions) == 2
    for text in predictions:
        assert text.strip(), predictions
        assert all(char.isprintable() or char == "\n" for char in text), text
    assert predictions[0] != predictions[1]
    assert output["repeats"] == [None, None]  # max_length 96 is below nougat's repetition horizon


def test_deterministic_idempotent_and_overwrite(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    for name in CHECKPOINT_FILES:
        assert _sha256(again / name) == _sha256(tiny_dir / name), name
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    assert _sha256(other / "pytorch_model.bin") != _sha256(tiny_dir / "pytorch_model.bin")

    # Same parameters: reused untouched.
    before = {name: (tiny_dir / name).stat().st_mtime_ns for name in CHECKPOINT_FILES}
    assert build_tiny_checkpoint(tiny_dir, seed=0) == tiny_dir
    assert {name: (tiny_dir / name).stat().st_mtime_ns for name in CHECKPOINT_FILES} == before

    # Different parameters: refused unless overwrite.
    with pytest.raises(FileExistsError):
        build_tiny_checkpoint(other, seed=0)
    build_tiny_checkpoint(other, seed=0, overwrite=True)
    params = read_tiny_checkpoint_params(other)
    assert params == {"format_version": FORMAT_VERSION, "seed": 0, "max_length": 96}
    assert _sha256(other / "pytorch_model.bin") == _sha256(tiny_dir / "pytorch_model.bin")
    assert sorted(p.name for p in other.iterdir()) == sorted(CHECKPOINT_FILES)  # no staging left


def test_stale_format_is_rebuilt(tiny_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    shutil.copytree(tiny_dir, stale)
    config = json.loads((stale / "config.json").read_text())
    config[MARKER_KEY]["format_version"] = FORMAT_VERSION - 1
    (stale / "config.json").write_text(json.dumps(config))
    (stale / "pytorch_model.bin").write_bytes(b"old weights")
    build_tiny_checkpoint(stale, seed=0)
    assert _sha256(stale / "pytorch_model.bin") == _sha256(tiny_dir / "pytorch_model.bin")
    assert read_tiny_checkpoint_params(stale) == read_tiny_checkpoint_params(tiny_dir)


def test_max_length_sets_both_config_fields(tmp_path: Path) -> None:
    out = build_tiny_checkpoint(tmp_path / "short", seed=3, max_length=40)
    model = NougatModel.from_pretrained(out).eval()
    assert model.config.max_length == model.config.max_position_embeddings == 40
    # MBart's learned positions carry an offset of 2 rows.
    assert model.decoder.model.model.decoder.embed_positions.weight.shape[0] == 42
    image = model.encoder.prepare_input(_page(0), random_padding=False).unsqueeze(0)
    with torch.no_grad():
        output = model.inference(image_tensors=image)
    assert output["sequences"].shape[1] <= 40


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_tiny_checkpoint(tmp_path / "x", seed=-1)
    with pytest.raises(ValueError):
        build_tiny_checkpoint(tmp_path / "x", max_length=1)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        build_tiny_checkpoint(tmp_path / "file")


def test_cli(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tiny_dir), "--seed", "0"]) == 0  # reuses the existing build
    out = capsys.readouterr().out
    assert str(tiny_dir) in out and "RANDOM" in out

    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_dir), "--seed", "1"])
    assert exit_info.value.code == 2
    assert "overwrite" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out.lower()
    assert "random" in help_text and "--variant" in help_text


def test_variants_are_recorded_rebuilt_and_checked(tmp_path: Path) -> None:
    out = build_tiny_checkpoint(tmp_path / "eos", seed=0, max_length=24, variant="eos")
    params = read_tiny_checkpoint_params(out)
    assert params == {"format_version": FORMAT_VERSION, "seed": 0, "max_length": 24,
                      "variant": "eos"}
    # Another variant of the same seed and length is another checkpoint.
    with pytest.raises(FileExistsError):
        build_tiny_checkpoint(out, seed=0, max_length=24, variant="loop")
    with pytest.raises(FileExistsError):
        build_tiny_checkpoint(out, seed=0, max_length=24)
    with pytest.raises(ValueError):
        build_tiny_checkpoint(tmp_path / "x", variant="stutter")
    model = NougatModel.from_pretrained(out).eval()
    assert model.config.max_length == 24
