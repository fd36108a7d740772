import numpy as np
import torch

from clipaudit.map.index import FaissNameIndex, TorchNameIndex


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_faiss_and_torch_backends_agree_with_brute_force():
    rng = np.random.default_rng(0)
    text = _unit(rng.normal(size=(3, 500, 16))).astype(np.float32)
    q = torch.from_numpy(_unit(rng.normal(size=(7, 16))).astype(np.float32))
    brute = np.argsort(-np.einsum("bd,tnd->tbn", q.numpy(), text), axis=-1)[..., :5]
    for index in (FaissNameIndex(text), TorchNameIndex(text, torch.device("cpu"), block_names=64)):
        scores, ids = index.search(q, 5)
        assert ids.shape == (3, 7, 5)
        np.testing.assert_array_equal(ids, brute)
        assert np.all(np.diff(scores, axis=-1) <= 1e-6)


def test_k_larger_than_pool_is_clamped():
    text = _unit(np.random.default_rng(1).normal(size=(1, 3, 8))).astype(np.float32)
    _, ids = FaissNameIndex(text).search(torch.ones(2, 8), 10)
    assert ids.shape == (1, 2, 3)
