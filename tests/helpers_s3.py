"""A moto S3 server in a thread, for the tests of object storage (one per test module).

moto keeps one in-memory backend per process, so each module uses a bucket of its own::

    with moto_s3("runs") as s3:
        s3["opts"]      # storage_options for fsspec / gradtrace (endpoint_url, key, secret)
        s3["endpoint"]  # http://127.0.0.1:PORT
        s3["fs"]        # an s3fs.S3FileSystem on that server, the bucket created
"""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def moto_s3(bucket: str):
    import s3fs
    from moto import server as moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
        fs.makedirs(bucket, exist_ok=True)
        yield {"opts": opts, "endpoint": endpoint, "fs": fs}
    finally:
        server.stop()
