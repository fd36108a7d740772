"""Does the installed moto authorise S3 reads as AWS does?

AWS authorises ``ListObjectsV2`` with the IAM action ``s3:ListBucket`` and ``HeadObject`` with
``s3:GetObject``. moto 5.2.6 refuses both to a user holding exactly those actions (it wants the
made-up actions ``s3:ListObjectsV2`` / ``s3:HeadObject``), which breaks the least-privilege tests
on the local S3 server; pyproject.toml therefore excludes it. This probe starts ``moto_server``
on 127.0.0.1, grants a user ``s3:GetObject`` + ``s3:ListBucket`` on one bucket and tries the
three reads. Exit 0: moto agrees with AWS; exit 1: it does not (the reason on stdout).

``python .ci/moto_iam_probe.py`` — run by ``tests/test_dependency_bounds.py`` on the installed
moto and by ``.ci/newest`` on the newest release (which says when the bound can go).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "probe-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe() -> list[str]:
    """The S3 calls a ListBucket + GetObject user is refused (empty: moto agrees with AWS)."""
    import boto3
    from botocore.exceptions import ClientError

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {endpoint}") from None
                time.sleep(0.1)
        admin = {"endpoint_url": endpoint, "aws_access_key_id": "admin", "aws_secret_access_key": "admin",
                 "region_name": "us-east-1"}
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="a.txt", Body=b"a")
        policy = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).close()  # IAM checks on from here
        reader = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key["AccessKeyId"],
                              aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1")
        refused = []
        for what, call in (("ListObjectsV2 (s3:ListBucket)", lambda: reader.list_objects_v2(Bucket=BUCKET)),
                           ("HeadObject (s3:GetObject)", lambda: reader.head_object(Bucket=BUCKET, Key="a.txt")),
                           ("GetObject (s3:GetObject)", lambda: reader.get_object(Bucket=BUCKET, Key="a.txt"))):
            try:
                call()
            except ClientError as e:
                refused.append(f"{what}: {e.response['Error'].get('Code')}")
        return refused
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    from importlib.metadata import version

    refused = probe()
    if refused:
        print(f"moto {version('moto')} refuses a ListBucket + GetObject user what AWS allows: " + "; ".join(refused))
        return 1
    print(f"moto {version('moto')} authorises ListObjectsV2/HeadObject/GetObject as AWS does")
    return 0


if __name__ == "__main__":
    sys.exit(main())
