"""GPU paths: half-precision models, nvJPEG decode, the GPU name index, device-side views,
one Ray actor per GPU. Skipped with the reason where CUDA is absent; BENCHMARKS.md lists
whether they have run on a GPU machine."""

import numpy as np
import pytest
import torch
from helpers import encode, photo_like, write_tiny_job

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")]

CUDA = torch.device("cuda")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_embeddings_agree_with_fp32(tiny_model, precision):
    from clipaudit.model.loading import load_model

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
    full = load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), "fp32", "cuda").encode_images(x)
    half = load_model(str(tiny_model["config"]), str(tiny_model["checkpoint"]), precision, "cuda").encode_images(x)
    assert half.dtype == torch.float32  # embeddings leave the model as float32 whatever it runs in
    assert torch.nn.functional.cosine_similarity(full, half).min() > 0.99


def test_nvjpeg_pixels_are_close_to_the_pillow_path():
    from clipaudit.data.decode import Preprocess, decode_image
    from clipaudit.data.device_decode import decode_on_device

    pre = Preprocess(224)
    datas = [encode(photo_like((640 + 16 * i, 480), seed=i)) for i in range(4)]
    out = decode_on_device(datas, pre, CUDA)
    for data, got in zip(datas, out):
        assert got is not None and got[0].device.type == "cuda"
        diff = np.abs(decode_image(data, pre, 10**8).pixels.astype(int) - got[0].cpu().numpy().astype(int))
        # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few levels at colour edges
        assert diff.mean() < 1.0 and diff.max() <= 16, (diff.mean(), diff.max())


def test_gpu_name_index_ranks_as_exact_cpu_search():
    from clipaudit.model.name_index import FaissNameIndex, build_name_index

    rng = np.random.default_rng(0)
    text = rng.normal(size=(3, 20_000, 64)).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    q = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(100, 64)).astype(np.float32)), dim=-1)
    _, exact = FaissNameIndex([text]).search(q, 10)
    _, gpu = build_name_index(text, "torch", CUDA).search(q.to(CUDA), 10)  # fp16 on the GPU
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(gpu.reshape(-1, 10), exact.reshape(-1, 10))])
    assert overlap >= 0.99, overlap


def test_faiss_gpu_index_ranks_as_exact_cpu_search():
    """The [gpu] extra's faiss-gpu backend (skipped with its reason where only faiss-cpu is installed)."""
    import faiss

    from clipaudit.model.name_index import FaissNameIndex, build_name_index

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss-gpu is not installed (pip install -e \".[gpu]\")")
    rng = np.random.default_rng(1)
    text = rng.normal(size=(2, 20_000, 64)).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    q = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(100, 64)).astype(np.float32)), dim=-1)
    s_exact, exact = FaissNameIndex([text]).search(q, 10)
    s_gpu, gpu = build_name_index(text, "faiss-gpu", CUDA).search(q.to(CUDA), 10)
    np.testing.assert_allclose(s_gpu, s_exact, atol=1e-4)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(gpu.reshape(-1, 10), exact.reshape(-1, 10))])
    assert overlap >= 0.999, overlap


def test_device_side_views_match_the_cpu_views():
    from clipaudit.attacks.augment import augmented_views, part_crops, sample_rng

    x = torch.rand(4, 3, 64, 64)
    rngs = lambda: [sample_rng(0, f"k{i}", i, "v") for i in range(4)]  # noqa: E731
    torch.testing.assert_close(augmented_views(x.to(CUDA), rngs(), 5).cpu(), augmented_views(x, rngs(), 5),
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(part_crops(x.to(CUDA), rngs(), 7, (0.1, 0.3)).cpu(),
                               part_crops(x, rngs(), 7, (0.1, 0.3)), atol=2e-3, rtol=0)


@pytest.mark.ray
def test_ray_places_one_actor_per_gpu(tiny_model, tmp_path, ray_session):
    import json

    from clipaudit.app.runner import run_job
    from clipaudit.app.jobs import load_job

    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=2, per_shard=16,
                         compute="executor: ray, max_retries: 1, gpus_per_worker: 1")
    spec = load_job(job)
    run_job(spec, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    compute = manifest["spec"]["compute"]  # the job as its workers ran it (auto resolved)
    assert compute["device"] == "cuda" and compute["decode"] == "gpu" and compute["index"] == "torch"
    assert ray_session.cluster_resources().get("GPU", 0) >= 1
