"""Which client reads an output's Parquet parts on object storage."""

import pytest


def test_s3_parts_are_read_by_pyarrows_own_client_where_its_settings_allow():
    s3fs = pytest.importorskip("s3fs")
    from pyarrow.fs import S3FileSystem

    from clipaudit.io.tables import arrow_filesystem

    endpoint = s3fs.S3FileSystem(key="k", secret="s", endpoint_url="http://127.0.0.1:9000")
    assert isinstance(arrow_filesystem(endpoint), S3FileSystem)
    aws = s3fs.S3FileSystem(key="k", secret="s", client_kwargs={"region_name": "eu-west-1"})
    assert isinstance(arrow_filesystem(aws), S3FileSystem)
    # settings the native client is not given: s3fs keeps reading
    for kept in (s3fs.S3FileSystem(anon=True, endpoint_url="http://127.0.0.1:9000"),
                 s3fs.S3FileSystem(key="k", secret="s", requester_pays=True,
                                   client_kwargs={"region_name": "eu-west-1"}),
                 s3fs.S3FileSystem(key="k", secret="s"),  # AWS without a region: s3fs finds the bucket's
                 s3fs.S3FileSystem(key="k", secret="s", endpoint_url="http://127.0.0.1:9000",
                                   client_kwargs={"verify": False})):
        assert arrow_filesystem(kept) is kept
    import fsspec

    memory = fsspec.filesystem("memory")
    assert arrow_filesystem(memory) is memory
