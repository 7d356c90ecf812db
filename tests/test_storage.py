"""One suite for both object stores: LocalStore (a folder) and MinioStore against a
real S3 server process (moto; production runs MinIO)."""
from __future__ import annotations

import hashlib
import http.server
import inspect
import os
import posixpath
import signal
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opensubject_tasks.config import StoreSettings
from opensubject_tasks.errors import BadInput, TransientError, UnsafeKey
from opensubject_tasks.storage import Keys, ObjectStore, check_key, make_store, safe_key, slug
from opensubject_tasks.storage import minio_store as minio_store_module
from opensubject_tasks.storage.base import check_object_key
from opensubject_tasks.storage.local import STAGING_DIR, LocalStore
from opensubject_tasks.storage.minio_store import MinioStore
from opensubject_tasks.storage.sources import file_uri, local_copy, parse_source

from conftest import S3Server, free_port

PART = 5 * 1024 * 1024  # the smallest part size S3 allows


@pytest.fixture(params=["local", pytest.param("minio", marks=pytest.mark.services)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    s3 = request.getfixturevalue("s3_store_settings")
    return make_store(s3.model_copy(update={"multipart_part_size": PART, "presign_expiry_s": 2}))


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# -- the interface ------------------------------------------------------------------
@pytest.mark.parametrize("impl", [LocalStore, MinioStore])
def test_implements_the_protocol_exactly(impl):
    for name, proto in inspect.getmembers(ObjectStore, inspect.isfunction):
        if name.startswith("_"):
            continue
        want = inspect.signature(proto)
        got = inspect.signature(getattr(impl, name))
        assert list(got.parameters) == list(want.parameters), name
        assert [p.default for p in got.parameters.values()] == [p.default for p in want.parameters.values()], name


def test_both_are_object_stores(store):
    assert isinstance(store, ObjectStore)


# -- round trips ------------------------------------------------------------------
def test_put_get_bytes_and_overwrite(store):
    store.put_bytes("videos/v1/meta.json", b'{"a": 1}', "application/json")
    assert store.get_bytes("videos/v1/meta.json") == b'{"a": 1}'
    store.put_bytes("videos/v1/meta.json", b"second")
    assert store.get_bytes("videos/v1/meta.json") == b"second"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_put_get_file(store, tmp_path):
    src = tmp_path / "in.bin"
    data = os.urandom(300_000)
    src.write_bytes(data)
    store.put_file("a/b/in.bin", src)
    out = tmp_path / "out" / "deep" / "copy.bin"
    store.get_file("a/b/in.bin", out)
    assert out.read_bytes() == data
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.bin"]  # no temp left beside it


def test_stat_exists_and_missing(store):
    store.put_bytes("x/y.txt", b"hello")
    info = store.stat("x/y.txt")
    assert (info.key, info.size) == ("x/y.txt", 5)
    assert info.etag == hashlib.md5(b"hello").hexdigest()  # noqa: S324 - S3's single-part ETag
    assert store.exists("x/y.txt")
    assert not store.exists("x/z.txt")
    assert not store.exists("x")  # a folder of objects is not an object
    with pytest.raises(FileNotFoundError):
        store.stat("x/z.txt")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("x/z.txt")


def test_list_with_prefix(store):
    for key in ["videos/a/1", "videos/a/2", "videos/ab/3", "other/4"]:
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list("videos/a/")] == ["videos/a/1", "videos/a/2"]
    # A plain string prefix, as in S3, not a folder.
    assert [o.key for o in store.list("videos/a")] == ["videos/a/1", "videos/a/2", "videos/ab/3"]
    assert [o.key for o in store.list()] == ["other/4", "videos/a/1", "videos/a/2", "videos/ab/3"]
    assert list(store.list("nothing/")) == []
    sizes = {o.key: o.size for o in store.list("videos/")}
    assert sizes["videos/ab/3"] == len(b"videos/ab/3")


def test_list_pages_resume_after_last_key(store, monkeypatch):
    # Small pages so that the paging path (start_after the last key) runs on 11 objects.
    monkeypatch.setattr(minio_store_module, "_LIST_PAGE", 3)
    keys = [f"p/{i:02d}" for i in range(11)]
    for k in keys:
        store.put_bytes(k, b"x")
    assert [o.key for o in store.list("p/")] == keys


def test_delete_is_idempotent(store):
    store.put_bytes("d/one", b"1")
    store.delete("d/one")
    assert not store.exists("d/one")
    store.delete("d/one")  # deleting a missing object is not an error (S3 semantics)
    with pytest.raises(FileNotFoundError):
        store.get_bytes("d/one")
    assert list(store.list("d/")) == []


def test_url_downloads(store):
    store.put_bytes("u/file.txt", b"via url")
    url = store.url("u/file.txt")
    expected_scheme = "file" if isinstance(store, LocalStore) else "http"
    assert urlsplit(url).scheme == expected_scheme
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310
        assert resp.read() == b"via url"


def test_presigned_url_carries_the_configured_expiry(s3_store_settings):
    """moto's S3 server does not enforce X-Amz-Expires (MinIO and AWS do), so this
    checks the signed expiry parameters rather than waiting for a refusal."""
    store = MinioStore.from_settings(s3_store_settings.model_copy(update={"presign_expiry_s": 2}))
    store.put_bytes("k", b"v")
    q = parse_qs(urlsplit(store.url("k")).query)
    assert q["X-Amz-Expires"] == ["2"]
    assert q["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and q["X-Amz-Signature"][0]
    signed_at = datetime.strptime(q["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 60
    assert parse_qs(urlsplit(store.url("k", expires_s=1)).query)["X-Amz-Expires"] == ["1"]
    for bad in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError, match="expiry"):
            store.url("k", expires_s=bad)


def test_large_object_goes_up_in_parts(store, tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(50):
            f.write(os.urandom(1024 * 1024))
    store.put_file("big/obj.bin", src)
    info = store.stat("big/obj.bin")
    assert info.size == 50 * 1024 * 1024
    if isinstance(store, MinioStore):
        assert info.etag.endswith("-10"), info.etag  # 10 parts of 5 MiB
    else:
        assert info.etag == hashlib.md5(src.read_bytes()).hexdigest()  # noqa: S324
    out = tmp_path / "back.bin"
    store.get_file("big/obj.bin", out)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_readers_never_see_a_half_written_object(store):
    a, b = b"a" * (3 * 1024 * 1024), b"b" * (3 * 1024 * 1024 + 7)
    store.put_bytes("atomic/obj", a)
    seen: list[int] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            data = store.get_bytes("atomic/obj")
            assert data in (a, b), f"torn read of {len(data)} bytes"
            seen.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(8):
            store.put_bytes("atomic/obj", b if i % 2 == 0 else a)
    finally:
        stop.set()
        t.join(30)
    assert seen and set(seen) <= {len(a), len(b)}


def test_failed_upload_leaves_nothing(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        store.put_file("f/never", tmp_path / "does-not-exist")
    assert not store.exists("f/never")
    assert list(store.list("f/")) == []
    if isinstance(store, LocalStore):
        assert list((store.root / STAGING_DIR).iterdir()) == []


# -- keys that must be refused ------------------------------------------------------
BAD_KEYS = [
    "../escape", "a/../../escape", "a/..", "..", ".", "./a", "a/./b", "/etc/passwd", "~/x",
    "a\x00b", "a\nb", "a\rb", "a\x1fb", "a\x7fb", "a\\b", "..\\escape", "", "a//b",
    "\uff0e\uff0e/escape", "a/\u202e/b", "a/\u2028b", "x/", "a/ /b", "a/. ./b", "k" * 1100,
]
OPS = {
    "put_bytes": lambda s, k, f: s.put_bytes(k, b"x"),
    "put_file": lambda s, k, f: s.put_file(k, f),
    "get_bytes": lambda s, k, f: s.get_bytes(k),
    "get_file": lambda s, k, f: s.get_file(k, f.parent / "out"),
    "exists": lambda s, k, f: s.exists(k),
    "stat": lambda s, k, f: s.stat(k),
    "delete": lambda s, k, f: s.delete(k),
    "url": lambda s, k, f: s.url(k),
}


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_escaping_keys_are_refused(store, key, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    before = _files_under(tmp_path)
    for name, op in OPS.items():
        with pytest.raises(UnsafeKey):
            op(store, key, src)
            pytest.fail(f"{name} accepted {key!r}")
    assert _files_under(tmp_path) == before  # nothing written anywhere


@pytest.mark.parametrize("prefix", ["../", "/abs", "a/../", "a\x00", "\\"], ids=repr)
def test_escaping_list_prefixes_are_refused(store, prefix):
    with pytest.raises(UnsafeKey):
        list(store.list(prefix))


def test_local_store_refuses_symlinks_out_of_its_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = LocalStore(tmp_path / "root")
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    (store.root / "filelink").symlink_to(outside / "secret")
    for key in ("link/secret", "link/new", "filelink"):
        with pytest.raises(UnsafeKey):
            store.get_bytes(key)
        with pytest.raises(UnsafeKey):
            store.put_bytes(key, b"overwrite")
    assert (outside / "secret").read_bytes() == b"secret"
    assert sorted(outside.iterdir()) == [outside / "secret"]
    assert list(store.list()) == []
    with pytest.raises(UnsafeKey):
        store.put_bytes(f"{STAGING_DIR}/x", b"reserved")


# -- keys from user-supplied names: a property test ----------------------------------
_nasty = st.sampled_from(["..", ".", "/", "\\", "\x00", "~", "\uff0e", " ", "%2e", "\u202e", "\n", "a", "é"])
names = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=()), max_size=40),  # incl. surrogates
    st.lists(_nasty, max_size=12).map("".join),
)


def _under(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and posixpath.normpath(key).startswith(prefix) and ".." not in key.split("/")


@settings(max_examples=300, deadline=None)
@given(name=names)
def test_user_names_never_escape_their_prefix(name):
    try:
        key = safe_key("users", "u1", name)
    except UnsafeKey:
        key = None
    if key is not None:
        assert _under(key, "users/u1/")
        with tempfile.TemporaryDirectory() as d:  # the file really lands inside users/u1
            base = Path(d)
            store = LocalStore(base / "root")
            store.put_bytes(key, b"x")
            inside = (base / "root" / "users" / "u1").resolve()
            files = _files_under(base)
            assert files and all(f.resolve().is_relative_to(inside) for f in files)

    raw = Keys.raw_video("raw/", name)  # slugged: always accepted, always one segment
    assert raw.startswith("raw/") and "/" not in raw[len("raw/"):]
    check_object_key(raw)

    try:
        ds = Keys.dataset(name, "shards", name)
    except UnsafeKey:
        ds = None
    if ds is not None:
        assert _under(ds, f"datasets/{slug(name)}/shards/")

    try:
        kf = Keys.sample_file(name, "s1", 1, "mask.png")
    except UnsafeKey:
        kf = None
    if kf is not None:  # an id is one segment: no landing in another video's folder
        assert kf == f"videos/{name}/samples/s1/a1/mask.png" and "/" not in name


@settings(max_examples=300, deadline=None)
@given(key=names)
def test_accepted_keys_are_plain_relative_paths(key):
    try:
        check_key(key)
    except UnsafeKey:
        return
    assert posixpath.normpath(key) == key.rstrip("/")
    assert not key.startswith(("/", "~")) and "\\" not in key and "\x00" not in key
    assert all(seg.strip(". ") for seg in key.rstrip("/").split("/"))


# -- MinioStore specifics: bucket on first use, transient faults ---------------------
def test_bucket_is_created_on_first_use(s3_store_settings):
    store = MinioStore.from_settings(s3_store_settings)
    assert not store.client.bucket_exists(s3_store_settings.bucket)
    assert not store.exists("anything")
    assert store.client.bucket_exists(s3_store_settings.bucket)


class _FixedAnswer(http.server.BaseHTTPRequestHandler):
    """A real HTTP server that answers every request with one S3 error."""
    status, code, count = 503, "SlowDown", 0

    def _answer(self):
        type(self).count += 1
        body = f"<Error><Code>{self.code}</Code><Message>test</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,code,expected_requests,error", [
    (503, "SlowDown", 4, TransientError),
    (500, "InternalError", 4, TransientError),
    (403, "AccessDenied", 1, Exception),  # not transient: no retry
])
def test_server_errors_retry_only_when_transient(status, code, expected_requests, error):
    handler = type("H", (_FixedAnswer,), {"status": status, "code": code, "count": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = MinioStore.from_settings(StoreSettings(
            kind="minio", endpoint=f"127.0.0.1:{server.server_port}", access_key="k", secret_key="s",
            region="us-east-1", retry_attempts=4, retry_initial_s=0.01, retry_max_wait_s=0.05,
        ))
        with pytest.raises(error) as info:
            store.get_bytes("some/key")
        assert handler.count == expected_requests
        if error is Exception:
            assert not isinstance(info.value, TransientError)
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_store_fails_within_the_bound():
    store = MinioStore.from_settings(StoreSettings(
        kind="minio", endpoint=f"127.0.0.1:{free_port()}", access_key="k", secret_key="s",
        region="us-east-1", retry_attempts=3, retry_initial_s=0.05, retry_max_wait_s=0.2,
        connect_timeout_s=1,
    ))
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="after 3 attempts"):
        store.put_bytes("k", b"v")
    assert time.monotonic() - t0 < 5


@pytest.mark.services  # starts an S3 server process of its own
def test_store_outage_is_ridden_out():
    """The S3 server process is frozen (SIGSTOP) for 3 s in the middle of work."""
    server = S3Server().start()
    try:
        store = MinioStore.from_settings(StoreSettings(
            kind="minio", endpoint=server.endpoint, access_key="k", secret_key="s", bucket="outage",
            region="us-east-1", retry_attempts=10, retry_initial_s=0.2, retry_max_wait_s=1.0,
            connect_timeout_s=1, read_timeout_s=1,
        ))
        store.put_bytes("before", b"1")
        os.kill(server.proc.pid, signal.SIGSTOP)
        resume = threading.Timer(3.0, os.kill, (server.proc.pid, signal.SIGCONT))
        resume.start()
        t0 = time.monotonic()
        store.put_bytes("during", b"2")
        waited = time.monotonic() - t0
        resume.join()
        assert waited >= 2.5  # it really had to wait the outage out
        assert store.get_bytes("during") == b"2"
        assert [o.key for o in store.list()] == ["before", "during"]
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


# -- sources: local files in place, store objects through a temp copy -----------------
def test_local_copy_uses_files_in_place(tmp_path):
    weird = tmp_path / "a b%20c\udcff.mp4"  # spaces, a literal %20, a non-UTF-8 byte
    weird.write_bytes(b"video")
    uri = file_uri(weird)
    assert uri.startswith("file:///") and parse_source(uri).path == weird
    store = LocalStore(tmp_path / "store")
    for src in (uri, str(weird)):
        with local_copy(store, src) as p:
            assert p == weird and p.read_bytes() == b"video"
    assert weird.exists()
    with pytest.raises(BadInput, match="missing"):
        with local_copy(store, file_uri(tmp_path / "gone.mp4")):
            pass


def test_local_copy_downloads_store_objects_to_a_temp_file(store):
    store.put_bytes("raw/clip.mp4", b"video bytes")
    with local_copy(store, "store://raw/clip.mp4") as p:
        assert p.suffix == ".mp4" and p.read_bytes() == b"video bytes"
        tmp = p
    assert not tmp.exists()
    with pytest.raises(RuntimeError):
        with local_copy(store, "store://raw/clip.mp4") as p:
            tmp = p
            raise RuntimeError("the stage failed")
    assert not tmp.exists()  # removed even when the block fails
    with pytest.raises(BadInput, match="missing"):
        with local_copy(store, "store://raw/none.mp4"):
            pass


@pytest.mark.parametrize("source", ["s3://bucket/key", "http://host/x.mp4", "store://../x", "file://otherhost/x", ""])
def test_unsupported_or_unsafe_sources_are_bad_input(source):
    with pytest.raises(BadInput):
        parse_source(source)


def test_local_store_drops_stale_temp_files_of_killed_writers(tmp_path):
    store = LocalStore(tmp_path / "root")
    stale, fresh = store.root / STAGING_DIR / "a.tmp", store.root / STAGING_DIR / "b.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"in flight")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    LocalStore(store.root)
    assert not stale.exists() and fresh.exists()
    assert list(store.list()) == [] and list(store.list(f"{STAGING_DIR}/")) == []  # never objects
