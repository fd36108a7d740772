import numpy as np
import pytest
import torch

from clipaudit.model.name_index import (APPROX_ABOVE, FaissNameIndex, IVFNameIndex, TorchNameIndex, ivf_params,
                                 resolve_backend)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_faiss_and_torch_backends_agree_with_brute_force():
    rng = np.random.default_rng(0)
    text = _unit(rng.normal(size=(3, 500, 16))).astype(np.float32)
    q = torch.from_numpy(_unit(rng.normal(size=(7, 16))).astype(np.float32))
    brute = np.argsort(-np.einsum("bd,tnd->tbn", q.numpy(), text), axis=-1)[..., :5]
    for index in (FaissNameIndex([text]), TorchNameIndex([text], torch.device("cpu"), block_names=64)):
        scores, ids = index.search(q, 5)
        assert ids.shape == (3, 7, 5)
        np.testing.assert_array_equal(ids, brute)
        assert np.all(np.diff(scores, axis=-1) <= 1e-6)


def test_k_larger_than_pool_is_clamped():
    text = _unit(np.random.default_rng(1).normal(size=(1, 3, 8))).astype(np.float32)
    _, ids = FaissNameIndex([text]).search(torch.ones(2, 8), 10)
    assert ids.shape == (1, 2, 3)


@pytest.mark.slow
def test_approximate_index_recall_on_real_name_embeddings(canary_lab):
    """recall@10 of the IVF index against exact search, on the trained lab model's text
    embeddings of 20,000 generated names and image embeddings of lab photos as queries."""
    from clipaudit.lab.identities import make_identities, make_names, render
    from clipaudit.model.loading import load_model

    model = load_model(str(canary_lab.model_config), str(canary_lab.trained), "fp32", "cpu")
    names = make_names(20_000, seed=3)
    text = model.encode_texts([f"a photo of {n}" for n in names]).numpy()[None]
    rng = np.random.default_rng(0)
    photos = np.stack([render(ident, rng, model.image_size)
                       for ident in make_identities(100, seed=5) for _ in range(2)])
    queries = model.encode_images(torch.from_numpy(photos))
    ivf = IVFNameIndex([text])
    assert (ivf.nlist, ivf.nprobe) == ivf_params(20_000)
    _, exact = FaissNameIndex([text]).search(queries, 10)
    _, approx = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx[0], exact[0])])
    assert recall >= 0.99, recall
    # probing one list is much worse: the parameters matter, the test can tell
    _, one = IVFNameIndex([text], nprobe=1).search(queries, 10)
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(one[0], exact[0])]) < recall


def test_auto_picks_the_approximate_index_on_a_cpu_from_the_threshold():
    assert resolve_backend("auto", "cpu", APPROX_ABOVE - 1) == "faiss"
    assert resolve_backend("auto", "cpu", APPROX_ABOVE) == "faiss-ivf"
    assert resolve_backend("auto", "cuda", 10 ** 6) == "torch"
    assert resolve_backend("faiss", "cpu", 10 ** 6) == "faiss"


def test_ivf_index_is_the_same_when_built_twice():
    """Every worker builds its own index: the lists must not depend on the build."""
    rng = np.random.default_rng(2)
    text = _unit(rng.normal(size=(2, 3000, 16))).astype(np.float32)
    q = torch.from_numpy(_unit(rng.normal(size=(50, 16))).astype(np.float32))
    a, b = IVFNameIndex([text]).search(q, 5), IVFNameIndex([text]).search(q, 5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_faiss_gpu_backend_without_gpu_faiss_or_cuda_says_what_is_missing():
    import faiss

    from clipaudit.model.name_index import build_name_index

    text = _unit(np.random.default_rng(0).normal(size=(1, 50, 8)).astype(np.float32))
    want = "pip install -e" if not hasattr(faiss, "StandardGpuResources") else "needs a CUDA device"
    with pytest.raises(RuntimeError, match=want):
        build_name_index(text, "faiss-gpu", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["faiss", "faiss-ivf", "torch"])
def test_an_index_built_from_parts_equals_the_index_of_the_whole_state(backend):
    """Workers build the index part by part from the memory-mapped float16 state: the same
    names, scores and ranks as from the state in one array (IVF: the same lists too)."""
    from clipaudit.model.name_index import build_name_index

    rng = np.random.default_rng(4)
    state = _unit(rng.normal(size=(3, 2500, 16))).astype(np.float16)
    parts = [state[:, :1000], state[:, 1000:1001], state[:, 1001:]]  # uneven, one of a single name
    q = torch.from_numpy(_unit(rng.normal(size=(40, 16))).astype(np.float32))
    whole_s, whole_i = build_name_index(state, backend, torch.device("cpu")).search(q, 7)
    part_s, part_i = build_name_index(parts, backend, torch.device("cpu")).search(q, 7)
    np.testing.assert_array_equal(part_i, whole_i)
    np.testing.assert_array_equal(part_s, whole_s)
    # float16 storage loses nothing against a float32 index of the same (float16) values
    exact = np.argsort(-np.einsum("bd,tnd->tbn", q.numpy(), state.astype(np.float32)), axis=-1, kind="stable")[..., :7]
    if backend != "faiss-ivf":
        np.testing.assert_array_equal(part_i, exact)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_the_ivf_index_equals_faiss_own_ivf_built_with_add(dtype):
    """The IVF lists are written once at their final size from the state's rows as float16 codes:
    the same lists, scores and ranks as FAISS's own index with float16 codes (IndexIVFScalarQuantizer)
    over the same quantizer, filled by ``add`` — for a float16 state and for float32 embeddings."""
    import faiss

    rng = np.random.default_rng(5)
    state = _unit(rng.normal(size=(2, 3000, 16))).astype(dtype)
    q = torch.from_numpy(_unit(rng.normal(size=(60, 16))).astype(np.float32))
    ours = IVFNameIndex([state[:, :1700], state[:, 1700:]])
    for t in range(2):
        ref = faiss.IndexIVFScalarQuantizer(ours._quantizer, 16, ours.nlist, faiss.ScalarQuantizer.QT_fp16,
                                            faiss.METRIC_INNER_PRODUCT, False)
        ref.train(state[t].astype(np.float32))
        ref.add(state[t].astype(np.float32))
        ref.nprobe = ours.nprobe
        s_ref, i_ref = ref.search(q.numpy(), 8)
        s_ours, i_ours = ours._indexes[t].search(q.numpy(), 8)
        np.testing.assert_array_equal(i_ours, i_ref)
        np.testing.assert_array_equal(s_ours, s_ref)
        assert ours._indexes[t].ntotal == 3000
        assert [ours._indexes[t].invlists.list_size(i) for i in range(ours.nlist)] == \
            [ref.invlists.list_size(i) for i in range(ours.nlist)]
