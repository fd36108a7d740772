"""PartCrop: crop-to-image responses, and crop-to-patch-token responses where the model has them."""

import json

import numpy as np
import torch

from clipaudit.attacks.base import MapBatch
from clipaudit.attacks.partcrop import PartCropAttack
from clipaudit.data.samples import Sample
from clipaudit.map.models import load_model


def _batch(model, n=3):
    rng = np.random.default_rng(0)
    px = torch.from_numpy(rng.integers(0, 255, (n, model.image_size, model.image_size, 3), dtype=np.uint8))
    images = model.to_unit(px)
    samples = [Sample(shard="s.tar", key=f"k{i}", position=i) for i in range(n)]
    return MapBatch(samples, images, model.encode_unit(images), model, seed=0, chunk=8)


def test_vit_patch_tokens_project_into_the_joint_space(tiny_model):
    model = load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), "fp32", "cpu")
    assert model.has_patch_tokens
    images = _batch(model).images
    pooled, tokens = model.encode_unit_tokens(images, chunk=2)
    torch.testing.assert_close(pooled, model.encode_unit(images))  # same pooled path as encode_image
    assert tokens.shape == (3, (32 // 8) ** 2, pooled.shape[1])
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(3, 16))


def test_partcrop_features_with_and_without_patch_tokens(tiny_model, tmp_path):
    vit = load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), "fp32", "cpu")
    out = PartCropAttack(crops=6, scale=(0.1, 0.3)).compute(_batch(vit))
    feats = np.array(out["partcrop_features"])
    assert feats.shape == (3, 26)  # 13 crop↔image values + 13 crop↔best-patch values
    np.testing.assert_allclose(feats[:, 11], out["partcrop_score"], atol=1e-4)  # mean cosine
    assert np.all(np.diff(feats[:, :11], axis=1) >= -1e-6) and np.all(np.diff(feats[:, 13:24], axis=1) >= -1e-6)
    assert np.all(feats[:, 13:24] <= 1.0 + 1e-4)
    # a convolutional tower exposes no patch tokens: crop↔image features only
    cfg = tmp_path / "tiny-test-rn.json"
    cfg.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                            "layers": 1}}))
    rn = load_model(str(cfg), None, "fp32", "cpu")
    assert not rn.has_patch_tokens
    assert np.array(PartCropAttack(crops=6).compute(_batch(rn))["partcrop_features"]).shape == (3, 13)
