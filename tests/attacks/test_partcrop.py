"""PartCrop: crop-to-image responses, and crop-to-patch-token responses where the model has them."""

import json

import numpy as np
import torch

from clipaudit.attacks.base import MapBatch
from clipaudit.attacks.augment import part_crops, sample_rng
from clipaudit.attacks.partcrop import PartCropAttack, gaussian_prior, kl_responses, paper_responses, summaries
from clipaudit.attacks.views import source_canvas
from clipaudit.data.samples import Sample
from clipaudit.model.loading import load_model


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
    assert feats.shape == (3, 26 + 2 * 6)  # 13 crop↔image, 13 crop↔best-patch, 2×6 KL responses
    assert summaries(feats).shape == (3, 26) and paper_responses(feats).shape == (3, 12)
    kl = feats[:, 26:]
    assert np.all(kl >= -1e-5)  # KL divergences
    assert np.all(np.diff(kl[:, :6], axis=1) <= 1e-6) and np.all(np.diff(kl[:, 6:], axis=1) <= 1e-6)  # sorted
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
    rn_feats = np.array(PartCropAttack(crops=6).compute(_batch(rn))["partcrop_features"])
    assert rn_feats.shape == (3, 13)
    assert np.isnan(paper_responses(rn_feats)).all()  # the paper's attacker is skipped, not fed zeros


def test_gaussian_prior_is_a_centred_bell():
    p = gaussian_prior(49)
    assert abs(p.sum() - 1) < 1e-12 and np.allclose(p, p[::-1]) and p.argmax() == 24
    assert np.all(np.diff(p[:25]) > 0)


def test_kl_responses_measure_how_peaked_a_crop_is_over_the_patches():
    d, patches = 8, 16
    tokens = torch.nn.functional.normalize(torch.randn(1, patches, d, generator=torch.Generator().manual_seed(0)),
                                           dim=-1)
    crops = torch.stack([torch.zeros(d), tokens[0, 3]])[None]  # equally similar to every patch; one patch's own
    kl = kl_responses(crops, tokens, scale=100.0)[0]
    # sorted descending: the crop that matches one patch is far from uniform, the flat one is at 0
    assert kl[0] > 1.0 and abs(kl[1]) < 1e-3
    # a response equal to the Gaussian prior has KL 0 from it
    prior = torch.from_numpy(gaussian_prior(patches)).float()
    logits = prior.log()  # softmax(log p) = p: one-hot "tokens" with the crop's similarities set to log p
    eye = torch.eye(patches)[None]
    to_prior = kl_responses(logits[None, None] / 50.0, eye, scale=50.0)[0]  # [KL from uniform, KL from Gaussian]
    assert abs(float(to_prior[1])) < 1e-5 and float(to_prior[0]) > 1e-3


def test_crops_are_cut_from_the_original_and_never_from_padding(tiny_model):
    """A wide photo whose sides (outside the model's centre crop) are red: crops of the
    original reach them; an image smaller than the canvas is padded with its own edge."""
    model = load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), "fp32", "cpu")
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :40, 0] = wide[:, 80:, 0] = 255  # red sides
    wide[:, 40:80, 1] = 255  # green centre: all the centre crop shows
    small = np.zeros((10, 12, 3), np.uint8)
    small[..., 2] = 255  # all blue, in a canvas of 40×120
    samples = [Sample(shard="s.tar", key=k, position=i) for i, k in enumerate("ab")]
    centre = model.to_unit(torch.from_numpy(np.stack([wide[4:36, 44:76],
                                                      small[:, :10].repeat(4, 0).repeat(4, 1)[:32, :32]])))
    batch = MapBatch(samples, centre, model.encode_unit(centre), model, 0, 8, sources=[wide, small])
    canvas, sizes = source_canvas(batch, 0, 2)
    assert sizes == [(120, 40), (12, 10)] and canvas.shape == (2, 3, 40, 120)
    rngs = [sample_rng(0, s.key, s.position, "partcrop") for s in samples]
    crops = part_crops(canvas, rngs, 32, (0.08, 0.2), sizes, 32).view(2, 32, 3, 32, 32)
    red = crops[0, :, 0].mean(dim=(1, 2)) > 0.5
    assert red.any() and not red.all()  # some crops lie in the sides the centre crop cuts away
    # PartCrop's own crops keep to the centred square the model's input (and its tokens) shows
    square = part_crops(canvas, rngs, 32, (0.08, 0.2), sizes, 32, centre_square=True).view(2, 32, 3, 32, 32)
    # green throughout; only bilinear sampling at the square's edge may blend in a trace of the red next to it
    assert (square[0, :, 0].mean(dim=(1, 2)) < 0.05).all() and (square[0, :, 1].mean(dim=(1, 2)) > 0.95).all()
    torch.testing.assert_close(crops[1], torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand_as(crops[1]))
    without = MapBatch(samples, centre, batch.emb, model, 0, 8)  # no sources: the model input itself
    c2, s2 = source_canvas(without, 0, 2)
    assert s2 == [(32, 32)] * 2 and torch.equal(c2, centre)


def test_partcrop_takes_the_patch_tokens_of_the_main_pass_and_gets_what_a_pass_of_its_own_gives(
        tiny_model, monkeypatch):
    """The map step's main pass keeps the patch tokens (MapBatch.tokens): PartCrop reads them instead
    of running the tower again, with the same features; a batch without them gets its own pass."""
    from dataclasses import replace

    from clipaudit.model.loading import LoadedModel

    vit = load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), "fp32", "cpu")
    batch = _batch(vit)
    pooled, tokens = vit.encode_unit_tokens(batch.images)
    assert torch.equal(pooled, batch.emb)  # the main pass's embedding, bit for bit
    calls = []
    real = LoadedModel.encode_unit_tokens
    monkeypatch.setattr(LoadedModel, "encode_unit_tokens", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    attack = PartCropAttack(crops=6, scale=(0.1, 0.3))
    from_main = attack.compute(replace(batch, tokens=tokens))
    assert calls == []
    own = attack.compute(batch)
    assert calls == [1]
    assert from_main == own
