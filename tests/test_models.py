"""`opensubject models fetch / check` and the build's refusal to start without weights,
offline: a local HTTP server stands in for the Hugging Face Hub (its model API and
``resolve`` URLs, with range requests), serving the tiny models under the real repository
names, so the fetched files are then loaded through the real backends."""
from __future__ import annotations

import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from opensubject_tasks import weights
from opensubject_tasks.backends.hf import tiny
from opensubject_tasks.backends.registry import clear_cache
from opensubject_tasks.cli import main
from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.errors import ModelNotAvailable

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# files a backend never loads: fetching them would waste the download
NOT_WANTED = {"pytorch_model.bin": b"x" * 100, "flax_model.msgpack": b"y" * 50,
              "model.fp16.safetensors": b"z" * 70}


class FakeHub:
    """Repositories as {path: bytes}; records every request; can cut a file's first
    transfer short (a dropped connection) or corrupt one."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.files: dict[str, bytes] = {}          # plain URL path -> bytes
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}              # path -> bytes sent before dropping, once
        self.corrupt: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # noqa: ANN002 - quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((path, self.headers.get("Range")))
                if path.startswith("/api/models/"):
                    repo, _, _rev = path[len("/api/models/"):].partition("/revision/")
                    if repo not in hub.repos:
                        return self._send(404, b'{"error": "not found"}')
                    return self._send(200, json.dumps(hub.info(repo)).encode())
                if "/resolve/" in path:
                    repo, _, rest = path.lstrip("/").partition("/resolve/")
                    name = rest.split("/", 1)[1]
                    data = hub.repos.get(repo, {}).get(name)
                    return self._file(f"{repo}/{name}", data)
                return self._file(path, hub.files.get(path))

            def _file(self, key, data):  # noqa: ANN001
                if data is None:
                    return self._send(404, b"not found")
                if key in hub.corrupt:
                    data = bytes(b ^ 0xFF for b in data)
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if key in hub.cut and not rng:
                    self.wfile.write(body[:hub.cut.pop(key)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _send(self, code, body):  # noqa: ANN001
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def info(self, repo: str) -> dict:
        siblings = []
        for name, data in sorted(self.repos[repo].items()):
            entry = {"rfilename": name, "size": len(data),
                     "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()}
            if name.endswith((".safetensors", ".bin", ".msgpack")):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            siblings.append(entry)
        return {"id": repo, "sha": COMMIT, "siblings": siblings}

    def add_dir(self, repo: str, directory: Path, extra: dict[str, bytes] | None = None) -> None:
        files = {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
        self.repos[repo] = files | (extra or {})


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    import os

    root = tmp_path_factory.mktemp("tiny-models")
    old = os.environ.get("OPENSUBJECT_TINY_CACHE")
    os.environ["OPENSUBJECT_TINY_CACHE"] = str(root)
    try:
        yield tiny.ensure_tiny_models()
    finally:
        if old is None:
            os.environ.pop("OPENSUBJECT_TINY_CACHE", None)
        else:
            os.environ["OPENSUBJECT_TINY_CACHE"] = old


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch) -> None:
    """Whatever this machine has in its Hugging Face cache does not count here, nor the
    package's lock file (its commits are the real hub's): each test starts unpinned."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(weights, "LOCK_FILE", tmp_path / "weights_lock.yaml")


@pytest.fixture()
def hub(tiny_models, monkeypatch) -> FakeHub:
    """The gpu profile's repositories, each holding the tiny model of its kind."""
    h = FakeHub()
    d = weights.DEFAULT_MODELS
    h.add_dir(d[("vlm", "hf")], tiny_models["vlm"], NOT_WANTED)
    h.add_dir(d[("detector", "hf")], tiny_models["detector"])
    h.add_dir(d[("segmenter", "hf")], tiny_models["segmenter"])
    # the inpainter publishes an fp16 copy of every weight file, as SDXL inpainting does
    fp16 = {str(p.relative_to(tiny_models["inpainter"])).replace(".safetensors", ".fp16.safetensors"): p.read_bytes()
            for p in tiny_models["inpainter"].rglob("*.safetensors")}
    h.add_dir(d[("inpainter", "hf")], tiny_models["inpainter"],
              {"single_file_checkpoint.safetensors": b"s" * 64} | fp16)
    h.add_dir(d[("embedder", "hf")], tiny_models["clip"])
    buf = io.BytesIO()        # the tiny head as a torch state dict, like LAION's .pth
    from safetensors.torch import load_file

    torch.save(load_file(str(tiny_models["aesthetic_head.safetensors"])), buf)
    h.files["/head/sac+logos+ava1-l14-linearMSE.pth"] = buf.getvalue()
    monkeypatch.setattr(weights, "AESTHETIC_HEAD", weights.UrlFile(
        url=h.url + "/head/sac%2Blogos%2Bava1-l14-linearMSE.pth",
        sha256=hashlib.sha256(buf.getvalue()).hexdigest(), dest=weights.AESTHETIC_HEAD.dest))
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    h.server.shutdown()


def gpu_settings(models_dir: Path, **extra):
    return load_settings(profile="gpu", backends={"models_dir": str(models_dir), "device": "cpu"},
                         verify={"same_individual_min": {"clip-vit-large-patch14": 0.5}}, **extra)


def test_wanted_files_leave_out_other_formats_and_variants() -> None:
    names = ["config.json", "model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "tf_model.h5",
             "tokenizer.json", "merges.txt", "chat_template.jinja", "onnx/model.onnx", "README.md"]
    assert weights.wanted_files(names) == ["chat_template.jinja", "config.json", "merges.txt",
                                           "model.safetensors", "tokenizer.json"]
    diffusers = ["model_index.json", "one_file.safetensors", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert weights.wanted_files(diffusers) == ["model_index.json", "unet/config.json",
                                               "unet/diffusion_pytorch_model.safetensors"]
    assert weights.wanted_files(diffusers, variant="fp16") == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]


def test_check_lists_every_missing_weight_and_exits_nonzero(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("OPENSUBJECT_BACKENDS__MODELS_DIR", str(tmp_path / "models"))
    assert main(["models", "check", "--profile", "gpu"]) == 1
    out = capsys.readouterr().out
    for repo in ("Qwen/Qwen2.5-VL-7B-Instruct", "google/owlv2-large-patch14-ensemble", "facebook/sam-vit-huge",
                 "stable-diffusion-xl-1.0-inpainting-0.1", "openai/clip-vit-large-patch14",
                 "sac+logos+ava1-l14-linearMSE.pth", "same-individual threshold"):
        assert repo in out.replace("\n", "").replace("│", "").replace(" ", "") or repo in out, repo
    assert out.count("missing") >= 7
    assert main(["models", "check", "--profile", "cpu"]) == 0      # classical: nothing to fetch


def test_run_refuses_to_start_without_weights(tmp_path, sample_media, capsys, monkeypatch) -> None:
    monkeypatch.setenv("OPENSUBJECT_BACKENDS__MODELS_DIR", str(tmp_path / "models"))
    out = tmp_path / "out"
    assert main(["run", str(sample_media), "--out", str(out), "--profile", "gpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("opensubject: cannot run: the gpu profile cannot start, 7 missing: "
                          "Qwen/Qwen2.5-VL-7B-Instruct (vlm); google/owlv2-large-patch14-ensemble (detector); ")
    assert "same-individual threshold for hf:openai/clip-vit-large-patch14" in err
    assert "opensubject models fetch --profile gpu" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()                     # stopped before any video, nothing written


def test_fetch_gets_every_weight_resumably_with_checksums_then_backends_load_them(hub, tmp_path) -> None:
    models = tmp_path / "models"
    settings = gpu_settings(models)
    vlm_repo = weights.DEFAULT_MODELS[("vlm", "hf")]
    cut = 3 * weights._NET_CHUNK
    hub.cut[f"{vlm_repo}/model.safetensors"] = cut           # the connection drops after 192 KiB
    log: list[str] = []
    report = weights.fetch(settings, weights.Fetcher(log=log.append))
    assert report.ok, [(s.weight.label, s.state, s.detail) for s in report.statuses]
    # resumed with a range request from where the dropped transfer stopped
    assert (f"/{vlm_repo}/resolve/{COMMIT}/model.safetensors", f"bytes={cut}-") in hub.requests
    assert any("resuming" in line for line in log)
    vlm_dir = models / vlm_repo
    assert (vlm_dir / "model.safetensors").read_bytes() == hub.repos[vlm_repo]["model.safetensors"]
    assert not any((vlm_dir / n).exists() for n in NOT_WANTED)           # other formats left out
    assert not (models / weights.DEFAULT_MODELS[("inpainter", "hf")] / "single_file_checkpoint.safetensors").exists()
    assert not list(models.rglob("*.part"))
    record = json.loads((vlm_dir / weights.RECORD).read_text())
    assert record["commit"] == COMMIT and record["complete"] is True
    assert record["files"]["model.safetensors"]["sha256"] == hashlib.sha256(
        hub.repos[vlm_repo]["model.safetensors"]).hexdigest()
    assert (models / weights.AESTHETIC_HEAD.dest).is_file()
    assert weights.check(settings, verify=True).ok

    # a second fetch downloads nothing
    hub.requests.clear()
    assert weights.fetch(settings, weights.Fetcher(log=log.append)).ok
    assert not [p for p, _ in hub.requests if "/resolve/" in p or p.startswith("/head/")]

    # the backends load the fetched files (Context points them at the models directory)
    clear_cache()
    try:
        ctx = Context.from_settings(load_settings(
            profile="gpu", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            store={"kind": "local", "local_root": str(tmp_path / "store")},
            backends={"models_dir": str(models), "device": "cpu", "options": {
                "vlm": tiny.TINY_DEFAULTS["vlm"], "inpainter": tiny.TINY_DEFAULTS["inpainter"],
                "detector": tiny.TINY_DEFAULTS["detector"], "quality": {"score_range": [-1, 1]}}}))
        for interface in ("vlm", "detector", "segmenter", "inpainter", "embedder", "quality"):
            backend = ctx.backend(interface)
            assert str(models) in str(getattr(backend, "path", "") or backend.embedder.path), interface
        assert ctx.backend("vlm").name.startswith(f"hf:{vlm_repo}+prompts@")   # recorded by Hub id
    finally:
        clear_cache()


def test_interrupted_fetch_is_incomplete_then_resumes_from_the_part_file(hub, tmp_path) -> None:
    models = tmp_path / "models"
    repo = weights.DEFAULT_MODELS[("segmenter", "hf")]
    data = hub.repos[repo]["model.safetensors"]
    f = weights.Fetcher(retries=1, log=lambda _: None)
    cut = 2 * weights._NET_CHUNK
    assert len(data) > cut
    hub.cut[f"{repo}/model.safetensors"] = cut
    with pytest.raises(ModelNotAvailable, match="download incomplete after 1 tries"):
        f.fetch_repo(repo, models / repo)
    part = models / repo / "model.safetensors.part"
    assert part.stat().st_size == cut
    settings = gpu_settings(models)
    seg = next(s for s in weights.check(settings).statuses if "segmenter" in s.weight.interfaces)
    assert seg.state == "incomplete" and "did not finish" in seg.detail   # not taken for a model
    hub.requests.clear()
    f.fetch_repo(repo, models / repo)                                     # a later run continues
    assert (f"/{repo}/resolve/{COMMIT}/model.safetensors", f"bytes={cut}-") in hub.requests
    assert (models / repo / "model.safetensors").read_bytes() == data and not part.exists()


def test_a_file_that_does_not_match_its_checksum_is_refused(hub, tmp_path) -> None:
    repo = weights.DEFAULT_MODELS[("embedder", "hf")]
    hub.corrupt.add(f"{repo}/model.safetensors")
    with pytest.raises(ModelNotAvailable, match="does not match its published digest"):
        weights.Fetcher(log=lambda _: None).fetch_repo(repo, tmp_path / repo)
    assert not (tmp_path / repo / "model.safetensors").exists()
    assert not (tmp_path / repo / "model.safetensors.part").exists()
    hub.corrupt.add(f"{repo}/config.json")                               # a small (git blob) file
    hub.corrupt.discard(f"{repo}/model.safetensors")
    with pytest.raises(ModelNotAvailable, match="config.json: the downloaded file does not match"):
        weights.Fetcher(log=lambda _: None).fetch_repo(repo, tmp_path / "again" / repo)


def test_fetch_through_the_cli(hub, tmp_path, capsys) -> None:
    models = tmp_path / "models"
    assert main(["models", "fetch", "--profile", "gpu", "--models-dir", str(models)]) == 1   # no threshold yet
    out = capsys.readouterr().out
    assert "same-individual threshold" in out and out.count("present") >= 6
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"backends: {{models_dir: {models}}}\n"
                   "verify: {same_individual_min: {clip-vit-large-patch14: 0.5}}\n")
    assert main(["--config", str(cfg), "models", "check", "--profile", "gpu"]) == 0


def test_default_models_are_the_backend_classes_defaults() -> None:
    from opensubject_tasks.backends.hf import detector, embedder, florence, inpainter, segmenter, vlm

    d = weights.DEFAULT_MODELS
    assert d[("vlm", "hf")] == vlm.DEFAULT_VLM and d[("detector", "hf")] == detector.DEFAULT_DETECTOR
    assert d[("segmenter", "hf")] == segmenter.DEFAULT_SEGMENTER
    assert d[("inpainter", "hf")] == inpainter.DEFAULT_INPAINTER
    assert d[("embedder", "hf")] == d[("quality", "hf")] == embedder.DEFAULT_EMBEDDER
    assert d[("vlm", "florence")] == d[("detector", "florence")] == florence.DEFAULT_FLORENCE


def _bytes_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != weights.RECORD)


def test_lock_pins_commits_and_fp16_then_fetch_follows_it_and_check_says_what_is_left(
        hub, tmp_path, capsys) -> None:
    models = tmp_path / "models"
    settings = gpu_settings(models)
    d = weights.DEFAULT_MODELS
    inpainter = d[("inpainter", "hf")]

    # `models lock` through the (fake) hub: every repository pinned, fp16 where published
    assert main(["models", "lock", "--profile", "gpu"]) == 0
    pins = weights.load_lock()
    assert set(pins) == {d[(i, "hf")] for i in ("vlm", "detector", "segmenter", "inpainter", "embedder")}
    assert all(p.revision == COMMIT for p in pins.values())
    assert pins[inpainter].variant == "fp16"
    assert {p.variant for r, p in pins.items() if r != inpainter} == {None}   # no fp16 copies there

    # check, before anything is fetched and without the network: the size to fetch
    hub.requests.clear()
    report = weights.check(settings)
    assert not hub.requests
    todo, unknown = report.to_fetch()
    assert todo == sum(p.size for p in pins.values()) > 0
    assert unknown == [weights.AESTHETIC_HEAD.dest]            # a URL file: not in the lock
    capsys.readouterr()
    main(["--config", str(_cfg(tmp_path, models)), "models", "check", "--profile", "gpu"])
    out = capsys.readouterr().out
    from opensubject_tasks.models_cli import size_text

    assert f"To fetch: {size_text(todo)} of {size_text(todo)}" in out and "size not in the lock file: aesthetic/" in out

    # fetch asks for the pinned commit and the fp16 files only
    hub.requests.clear()
    assert weights.fetch(settings, weights.Fetcher(log=lambda _: None)).ok
    paths = [p for p, _ in hub.requests]
    assert f"/api/models/{inpainter}/revision/{COMMIT}" in paths
    fetched = [p.relative_to(models / inpainter) for p in (models / inpainter).rglob("*.safetensors")]
    assert fetched and all(p.name.endswith(".fp16.safetensors") for p in fetched)
    for repo, pin in pins.items():                             # the lock's sizes are what landed on disk
        assert _bytes_on_disk(models / repo) == pin.size, repo
    assert weights.check(settings).to_fetch() == (0, [])

    # the inpainter loads the precision that was fetched
    clear_cache()
    try:
        ctx = Context.from_settings(load_settings(
            profile="gpu", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            store={"kind": "local", "local_root": str(tmp_path / "store")},
            backends={"models_dir": str(models), "device": "cpu",
                      "options": {"inpainter": tiny.TINY_DEFAULTS["inpainter"]}}))
        assert weights.local_model_options(ctx.settings, "inpainter")["variant"] == "fp16"
        assert str(models) in str(ctx.backend("inpainter").path)
    finally:
        clear_cache()

    # a model fetched at another commit than the lock pins is fetched again
    lock_text = weights.LOCK_FILE.read_text()
    weights.LOCK_FILE.write_text(lock_text.replace(COMMIT, "f" * 40, 1))
    stale = [s for s in weights.check(settings).statuses if s.state != "present"]
    assert len(stale) == 1 and "the lock pins ffffffffffff" in stale[0].detail


def _cfg(tmp_path: Path, models: Path) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"backends: {{models_dir: {models}}}\n"
                   "verify: {same_individual_min: {clip-vit-large-patch14: 0.5}}\n")
    return cfg


def test_the_package_lock_file_is_well_formed() -> None:
    """The shipped lock (not the per-test one): 40-hex commits, sizes, known repositories."""
    from opensubject_tasks import weights as w

    pins = w.load_lock(Path(w.__file__).with_name("weights_lock.yaml"))
    assert pins and all(p.size and p.size > 0 for p in pins.values())
    assert set(pins) <= set(w.DEFAULT_MODELS.values()) | {"SimianLuo/LCM_Dreamshaper_v7", "facebook/sam-vit-base",
                                                           "facebook/dinov2-small"}
