import functools
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import encode, photo_like
from PIL import Image

from clipaudit.data.decode import decode_image
from clipaudit.model.loading import ModelLoadError, load_model, read_state_dict


def _embed(m) -> np.ndarray:
    px = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, m.image_size, m.image_size, 3), dtype=np.uint8))
    return torch.cat([m.encode_images(px), m.encode_texts(["a photo of Ann Lee.", "Bob"])]).numpy()


def test_checkpoint_round_trip_pt_safetensors_and_training_format(tiny_model, tmp_path):
    from safetensors.torch import save_file

    ref = load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), "fp32", "cpu")
    sd = read_state_dict(tiny_model["checkpoint"])
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "train.pt")
    a = _embed(ref)
    for path in (tmp_path / "w.safetensors", tmp_path / "train.pt"):
        other = load_model(str(tiny_model["config"]), str(path), "fp32", "cpu")
        np.testing.assert_array_equal(a, _embed(other))
    assert ref.checkpoint_sha256 and len(ref.checkpoint_sha256) == 64
    assert ref.image_size == 32 and ref.dtype == torch.float32


def test_random_init_is_seeded(tiny_model):
    a = load_model(str(tiny_model["config"]), None, "fp32", "cpu", seed=1)
    b = load_model(str(tiny_model["config"]), None, "fp32", "cpu", seed=1)
    np.testing.assert_array_equal(_embed(a), _embed(b))


def test_bf16_runs_and_fp16_on_cpu_falls_back(tiny_model):
    m = load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), "bf16", "cpu")
    assert m.dtype == torch.bfloat16 and np.isfinite(_embed(m)).all()
    assert load_model(str(tiny_model["config"]), None, "fp16", "cpu").dtype == torch.float32


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown model 'ViT-Nope-99'"):
        load_model("ViT-Nope-99", None, "fp32", "cpu")


def test_missing_checkpoint_and_config(tiny_model, tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        load_model(str(tiny_model["config"]), str(tmp_path / "gone.pt"), "fp32", "cpu")
    with pytest.raises(ModelLoadError, match="model config not found"):
        load_model(str(tmp_path / "gone.json"), None, "fp32", "cpu")


def test_state_dict_mismatch(tiny_model, tmp_path):
    sd = read_state_dict(tiny_model["checkpoint"])
    sd.pop("logit_scale")
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="does not match.*missing.*unexpected"):
        load_model(str(tiny_model["config"]), str(tmp_path / "bad.pt"), "fp32", "cpu")
    sd = read_state_dict(tiny_model["checkpoint"])
    sd["positional_embedding"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError, match="positional_embedding.*shape"):
        load_model(str(tiny_model["config"]), str(tmp_path / "shape.pt"), "fp32", "cpu")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clipaudit-pwned-test",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = Path("/tmp/clipaudit-pwned-test")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(ModelLoadError, match="refused checkpoint .*could run code") as e:
        read_state_dict(path)
    assert "weights_only=False" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"identity,member\nAnn,true\n", b"\x89PNG\r\n\x1a\n"])
def test_a_file_that_is_not_a_checkpoint_is_named_as_such_at_spec_time(tmp_path, content, capsys):
    from clipaudit.cli import main

    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(content)
    with pytest.raises(ModelLoadError, match="is not a loadable checkpoint") as e:
        read_state_dict(ckpt)
    assert "weights_only" not in str(e.value)
    from helpers import write_minimal_job

    job = write_minimal_job(tmp_path, model="{name: ViT-B-32, pretrained: weights.pt}")
    assert main(["run", str(job), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained:" in err and "is not a loadable checkpoint" in err and "weights_only" not in err


def test_hub_model_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hf-hub:nobody/no-such-clip"):
        load_model("hf-hub:nobody/no-such-clip", None, "fp32", "cpu")


def _force_preprocess(monkeypatch, **cfg):
    """Models created from now on carry ``cfg`` as their OpenCLIP preprocessing, as a pretrained
    tag or hub config sets it (e.g. DFN and SigLIP: squash; some: bilinear)."""
    import open_clip

    monkeypatch.setattr(open_clip, "create_model", functools.partial(open_clip.create_model, force_preprocess_cfg=cfg))


@pytest.mark.parametrize("cfg", [
    {},  # OpenCLIP's default: shortest side + centre crop, bicubic, OpenAI mean/std
    {"resize_mode": "squash", "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3},
    {"resize_mode": "longest", "fill_color": 0},
])
def test_model_input_matches_open_clip_preprocessing(tiny_model, monkeypatch, cfg):
    import open_clip

    _force_preprocess(monkeypatch, **cfg)
    m = load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), "fp32", "cpu")
    want = open_clip.get_model_preprocess_cfg(m.model)
    assert (m.resize_mode, m.interpolation, m.fill) == (want["resize_mode"], want["interpolation"], want["fill_color"])
    assert (m.mean, m.std) == (tuple(want["mean"]), tuple(want["std"]))
    reference = open_clip.image_transform(want["size"], is_train=False, mean=want["mean"], std=want["std"],
                                          resize_mode=want["resize_mode"], interpolation=want["interpolation"],
                                          fill_color=want["fill_color"])
    # One uint8 level in [0, 1] (see TOLERANCE in tests/data/test_decode.py; measured: 0), over
    # std in the normalised input, plus float32 rounding.
    tolerance = (1 / 255) / min(m.std) + 1e-5
    for size, fmt in [((1800, 2400), "JPEG"), ((1001, 667), "JPEG"), ((301, 173), "PNG"), ((30, 50), "PNG")]:
        data = encode(photo_like(size, seed=size[0]), fmt)
        px = decode_image(data, m.preprocess, 10_000_000).pixels
        # a batch of one, as the map step stacks them
        ours = m.normalize(m.to_unit(torch.from_numpy(np.stack([px]))))[0]
        theirs = reference(Image.open(io.BytesIO(data)))
        assert ours.shape == theirs.shape == (3, m.image_size, m.image_size)
        assert (ours - theirs).abs().max().item() <= tolerance, f"{size} {fmt}"


def test_unsupported_preprocessing_is_refused(tiny_model, monkeypatch):
    _force_preprocess(monkeypatch, resize_mode="crop")
    with pytest.raises(ModelLoadError, match="unsupported preprocessing: resize_mode 'crop'"):
        load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), "fp32", "cpu")
