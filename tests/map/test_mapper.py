"""The map step with JPEGs decoded on the model's device (the GPU path's code, with the CPU
decoder here): one row per sample, the same error rows, scores as with Pillow decode."""

import pyarrow.parquet as pq
from helpers import assert_same_rows, encode, image_bytes, photo_like, sample_files, write_tar

from clipaudit.io.outputs import OutputLayout
from clipaudit.model.image_hash import hamming
from clipaudit.map.mapper import ShardMapper
from clipaudit.app.jobs import load_job
from clipaudit.app.resolve import map_hash


def test_device_decode_gives_the_rows_of_the_pillow_path(tiny_model, tmp_path):
    photos = [encode(photo_like((80 + 7 * i, 64 + 5 * i), seed=i)) for i in range(10)]
    truncated = photos[0][: len(photos[0]) // 3]
    members = []
    for i, data in enumerate(photos):
        members += sample_files(f"k{i:03d}", f"P{i % 3}", data)
    members += sample_files("png", "P0", image_bytes(fmt="PNG", size=(70, 70)), ext="png")  # Pillow path
    members += sample_files("cmyk", "P1", encode(photo_like((90, 90)).convert("CMYK")))  # Pillow path
    members += sample_files("cut", "P2", truncated)  # eligible header, broken data
    members += sample_files("zero", "P2", b"")
    write_tar(tmp_path / "a.tar", members)
    (tmp_path / "names.txt").write_text("P0\nP1\nP2\nP3\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"""
model: {{name: {tiny_model['config']}, pretrained: {tiny_model['checkpoint']}, precision: fp32}}
data: {{shards: a.tar}}
names: names.txt
attacks: {{idia: {{top_k: 3}}, encodermi: {{views: 4}}}}
compute: {{executor: local, batch_size: 6, decode_threads: 1, decode: cpu}}
output: out
""")
    spec = load_job(job)
    outs = {}
    for name, on_device in (("pillow", False), ("device", True)):
        layout = OutputLayout(tmp_path / name)
        mapper = ShardMapper(spec, layout, map_hash(spec))
        mapper.device_decode = on_device  # the device path, on this machine's CPU decoder
        mapper.setup_here()
        stats = mapper.map_shard(str(tmp_path / "a.tar"))
        mapper.close()
        outs[name] = (layout.root, stats)
    assert outs["device"][1].rows == outs["pillow"][1].rows == 14
    assert outs["device"][1].errors == outs["pillow"][1].errors
    rows = pq.read_table(outs["device"][0] / "samples").to_pylist()
    assert next(r for r in rows if r["key"] == "cut")["error"] == "decode_error"  # Pillow's code, after the fallback
    # every column equal, scores within 0.05 and image hashes within 3 of 64 bits (one-level
    # pixel roundings move them a little; copies of a photo differ by up to 4 bits, see map/image_hash.py)
    assert_same_rows(outs["device"][0], outs["pillow"][0], float_tol=0.05,
                     close={"dhash": lambda a, b: hamming(a, b) <= 3})


def test_shards_in_flight_fetch_and_publish_beside_the_compute_and_give_the_same_rows(tiny_model, tmp_path,
                                                                                     monkeypatch):
    """Two shards in flight (the default): the second shard's tar is fetched while the first
    computes, and the first one's parts are published while the second computes; every column
    equals one-at-a-time mapping."""
    import threading

    import fsspec
    from helpers import SAME_EXECUTOR_TOL, assert_same_outputs, write_tiny_job

    from clipaudit.app.runner import run_job
    from clipaudit.map import mapper as mapper_module

    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=3, per_shard=24,
                         compute="executor: local, max_retries: 0")
    fs = fsspec.filesystem("memory")
    urls = []
    for s in range(3):
        fs.pipe(f"/clipaudit-in-flight/{s:05d}.tar", (tmp_path / "shards" / f"{s:05d}.tar").read_bytes())
        urls.append(f"memory://clipaudit-in-flight/{s:05d}.tar")
    events, lock = [], threading.Lock()

    def note(what: str, shard: str) -> None:
        with lock:
            events.append((what, shard.rsplit("/", 1)[-1]))

    fetch, compute, publish = mapper_module.fetched_shard, mapper_module.ShardMapper._map, \
        mapper_module.ShardMapper._publish

    def fetched(shard, *args):
        note("fetch", shard)
        return fetch(shard, *args)

    def mapped(self, shard, *args):
        out = compute(self, shard, *args)
        note("computed", shard)
        return out

    def published(self, shard, *args):
        note("publish", shard)
        return publish(self, shard, *args)

    monkeypatch.setattr(mapper_module, "fetched_shard", fetched)
    monkeypatch.setattr(mapper_module.ShardMapper, "_map", mapped)
    monkeypatch.setattr(mapper_module.ShardMapper, "_publish", published)
    spec = load_job(job)
    runs = {}
    for n in (2, 1):
        compute_spec = spec.compute.model_copy(update={"shards_in_flight": n})
        events.clear()
        runs[n] = run_job(spec.model_copy(update={"data": spec.data.model_copy(update={"shards": urls}),
                                                  "compute": compute_spec, "output": tmp_path / f"in-flight-{n}"}),
                          progress=False)
        assert runs[n].ok and runs[n].summary["rows"] == 72
        if n == 2:
            # either shard may take the compute lock first: name them by the order they computed
            at = {e: i for i, e in enumerate(events)}
            first, second = [s for w, s in events if w == "computed"][:2]
            assert at[("fetch", second)] < at[("computed", first)], events
            assert at[("publish", first)] < at[("computed", second)], events
        else:  # one at a time: each shard fetched after the last one was published
            assert [w for w, _ in events] == ["fetch", "computed", "publish"] * 3, events
    assert_same_outputs(tmp_path / "in-flight-2", tmp_path / "in-flight-1", SAME_EXECUTOR_TOL)


def test_shard_copies_of_processes_that_are_gone_are_removed(tmp_path, monkeypatch):
    """An actor killed mid-fetch cannot remove its copy: the next mapper on the node does."""
    import os
    import subprocess
    import sys

    from clipaudit.io.store import SCRATCH_ENV
    from clipaudit.map.mapper import fetch_folder

    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for pid in (gone, str(os.getppid())):  # a finished process, and a running one (this test's parent)
        (tmp_path / "shards" / pid).mkdir(parents=True)
        (tmp_path / "shards" / pid / "shard-x.tar").write_bytes(b"half a tar")
    mine = fetch_folder()
    assert mine == tmp_path / "shards" / str(os.getpid())
    assert not (tmp_path / "shards" / gone).exists() and (tmp_path / "shards" / str(os.getppid())).is_dir()
