"""Model weights a profile needs: where they live, whether they are there, and fetching them.

Every model a configured backend loads is one entry: a Hugging Face Hub repository
(fetched into ``backends.models_dir/<owner>/<name>``) or a single file from a URL with a
pinned SHA-256 (the aesthetic head). Backends load from that directory when it holds
the model, else from the Hugging Face cache; nothing is downloaded at run time.

Fetching is resumable and checked: each file is written to ``<file>.part`` (a later run
continues it with an HTTP range request), its digest compared with the one the hub
publishes (SHA-256 for LFS files, the git blob id for small ones) or the pinned one,
and only then renamed into place; ``.opensubject-fetch.json`` in the model directory
records what was fetched, so ``check`` can tell a complete model from a partial one.

What is fetched is pinned in ``weights_lock.yaml`` (beside this module): per Hub
repository the commit to download, the precision variant (``fp16`` where the repository
publishes one, e.g. a diffusers pipeline's ``*.fp16.safetensors``) and the bytes those
files take, so ``check`` can say how much a profile still has to fetch without asking
the network. ``opensubject models lock`` refreshes it from the Hub.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import quote

import yaml

from opensubject_tasks.config import Settings
from opensubject_tasks.errors import ConfigError, ModelNotAvailable

HUB = "https://huggingface.co"
RECORD = ".opensubject-fetch.json"
LOCK_FILE = Path(__file__).with_name("weights_lock.yaml")
# Interfaces whose backends load a precision variant (``variant`` option); a pinned
# variant is passed to them so they load the files that were fetched.
VARIANT_INTERFACES = ("inpainter",)
_CHUNK = 1 << 20          # hashing
_NET_CHUNK = 1 << 16      # network reads: what arrived before a dropped connection is kept

# The model each model-loading backend uses when ``backends.options.<interface>.model``
# is not set (the backend classes hold the same defaults; a test keeps them equal).
DEFAULT_MODELS: dict[tuple[str, str], str] = {
    ("vlm", "hf"): "Qwen/Qwen2.5-VL-7B-Instruct",
    ("detector", "hf"): "google/owlv2-large-patch14-ensemble",
    ("segmenter", "hf"): "facebook/sam-vit-huge",
    ("inpainter", "hf"): "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    ("embedder", "hf"): "openai/clip-vit-large-patch14",
    ("quality", "hf"): "openai/clip-vit-large-patch14",
    ("vlm", "florence"): "florence-community/Florence-2-base",
    ("detector", "florence"): "florence-community/Florence-2-base",
}


@dataclass(frozen=True)
class UrlFile:
    url: str
    sha256: str
    dest: str                  # relative to the models directory
    size: int | None = None    # bytes


# LFS-free single file: LAION's improved aesthetic predictor head for CLIP ViT-L/14. The
# digest is the published one of this file; a mismatch stops the fetch.
AESTHETIC_HEAD = UrlFile(
    url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
        "sac%2Blogos%2Bava1-l14-linearMSE.pth",
    sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
    dest="aesthetic/sac+logos+ava1-l14-linearMSE.pth")


@dataclass
class Weight:
    """One model (or file) the configured backends load."""
    interfaces: list[str]
    model: str                       # Hub id, or the directory/file as configured
    path: Path                       # where it is (or will be) on this machine
    repo: str | None = None          # Hub repository to fetch it from
    variant: str | None = None       # e.g. "fp16": fetch *.fp16.safetensors only
    url: UrlFile | None = None       # a single file from a URL
    in_cache: Path | None = None     # found in the Hugging Face cache instead
    revision: str | None = None      # the commit the lock file pins (None: the hub's main)
    size: int | None = None          # bytes to fetch, from the lock file (None: not known)

    @property
    def label(self) -> str:
        return self.repo or (self.url.dest if self.url else self.model)


@dataclass
class Status:
    weight: Weight
    state: str                       # present | missing | incomplete
    detail: str = ""
    size: int = 0


@dataclass
class Problem:
    """A setting the build cannot start without (other than weights)."""
    what: str
    detail: str


@dataclass
class Report:
    statuses: list[Status] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.state == "present" for s in self.statuses)

    def to_fetch(self) -> tuple[int, list[str]]:
        """(bytes still to fetch by the lock file's sizes, weights not present whose size
        the lock does not know)."""
        todo = [s for s in self.statuses if s.state != "present"]
        return (sum(s.weight.size or 0 for s in todo),
                [s.weight.label for s in todo if s.weight.size is None])

    def total(self) -> tuple[int, list[str]]:
        """(bytes of every weight of the profile by the lock file, those it does not know)."""
        return (sum(s.weight.size or 0 for s in self.statuses),
                [s.weight.label for s in self.statuses if s.weight.size is None])

    def missing_text(self, profile: str) -> str:
        """One line naming everything missing (``models check`` shows where it looked)."""
        items = [f"{s.weight.label} ({', '.join(s.weight.interfaces)}{', ' + s.state if s.state != 'missing' else ''})"
                 for s in self.statuses if s.state != "present"]
        items += [p.what for p in self.problems]
        return (f"the {profile} profile cannot start, {len(items)} missing: {'; '.join(items)}. Fetch the "
                f"weights with `opensubject models fetch --profile {profile}`; `opensubject models check "
                f"--profile {profile}` shows where each was looked for")


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def models_dir(settings: Settings) -> Path:
    return Path(settings.backends.models_dir).expanduser()


def interface_options(settings: Settings, interface: str) -> dict[str, Any]:
    return dict(settings.backends.options.get(interface, {}))


@dataclass(frozen=True)
class Pin:
    """One Hub repository in the lock file."""
    revision: str
    variant: str | None
    size: int | None                 # bytes of the files fetched at that revision and variant
    files: int | None = None


def load_lock(path: Path | None = None) -> dict[str, Pin]:
    """The lock file: {repo: Pin}."""
    path = path or LOCK_FILE
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read the weights lock file {path}: {exc}") from exc
    pins = {}
    for repo, spec in (doc.get("repos") or {}).items():
        rev = str((spec or {}).get("revision") or "")
        if len(rev) != 40 or any(c not in "0123456789abcdef" for c in rev):
            raise ConfigError(f"weights lock file {path}: {repo} needs `revision`, a 40-hex-digit commit")
        pins[repo] = Pin(rev, spec.get("variant"), spec.get("size"), spec.get("files"))
    return pins


def write_lock(pins: dict[str, Pin], path: Path | None = None) -> None:
    path = path or LOCK_FILE
    head = ("# Hub revisions `opensubject models fetch` downloads: per repository the commit, the\n"
            "# precision variant (fp16 where the repository publishes one) and the bytes of the files\n"
            "# fetched (what `models check` reports). Written by `opensubject models lock`.\n")
    body = {"repos": {repo: {k: v for k, v in (("revision", p.revision), ("variant", p.variant),
                                                 ("size", p.size), ("files", p.files)) if v is not None}
                      for repo, p in sorted(pins.items())}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(head + yaml.safe_dump(body, sort_keys=False))
    os.replace(tmp, path)


def _pinned(w: Weight, pin: Pin | None, variant_set: bool) -> Weight:
    if pin is None:
        return w
    if not variant_set:
        w.variant = pin.variant
    w.revision = pin.revision
    w.size = pin.size if w.variant == pin.variant else None
    return w


def required_weights(settings: Settings) -> list[Weight]:
    """Every model (and file) the settings' backends load, once each; Hub repositories
    carry the lock file's revision, variant (unless the settings set one) and size."""
    root = models_dir(settings)
    lock = load_lock()
    out: dict[str, Weight] = {}
    for interface in ("vlm", "detector", "segmenter", "inpainter", "embedder", "quality"):
        backend = getattr(settings.backends, interface)
        default = DEFAULT_MODELS.get((interface, backend))
        if default is None:
            continue                           # classical / none / tiny: no weights to fetch
        opts = interface_options(settings, interface)
        model = str(opts.get("model") or default)
        if _looks_like_path(model) or Path(model).expanduser().is_dir():
            w = Weight([interface], model, Path(model).expanduser(), variant=opts.get("variant"))
        else:
            w = _pinned(Weight([interface], model, root / model, repo=model, variant=opts.get("variant")),
                        lock.get(model), bool(opts.get("variant")))
        key = f"{w.path}|{w.variant}"
        if key in out:
            out[key].interfaces.append(interface)
        else:
            out[key] = w
        if interface == "quality" and backend == "hf":
            head = opts.get("head")
            if head:
                out[f"head|{head}"] = Weight(["quality head"], str(head), Path(str(head)).expanduser())
            else:
                out["head|default"] = Weight(["quality head"], AESTHETIC_HEAD.dest, root / AESTHETIC_HEAD.dest,
                                             url=AESTHETIC_HEAD, size=AESTHETIC_HEAD.size)
    return list(out.values())


def local_model_options(settings: Settings, interface: str) -> dict[str, Any]:
    """Options that point a backend at fetched weights: a Hub-id model that is in the
    models directory loads from there; the default aesthetic head likewise."""
    backend = getattr(settings.backends, interface)
    default = DEFAULT_MODELS.get((interface, backend))
    if default is None:
        return {}
    opts = interface_options(settings, interface)
    model = str(opts.get("model") or default)
    out: dict[str, Any] = {}
    if not _looks_like_path(model) and _complete_dir(models_dir(settings) / model)[0]:
        out["model"] = str(models_dir(settings) / model)
        if interface != "quality" and not opts.get("name"):
            out["name"] = f"{backend}:{model}"         # recorded by its Hub id, not this machine's path
        fetched = _record(models_dir(settings) / model).get("variant")
        if interface in VARIANT_INTERFACES and fetched and not opts.get("variant"):
            out["variant"] = fetched                   # load the precision that was fetched
    if interface == "quality" and backend == "hf" and not opts.get("head"):
        head = models_dir(settings) / AESTHETIC_HEAD.dest
        if head.is_file():
            out["head"] = str(head)
    return out


# ----------------------------------------------------------------------------- check

_CONFIGS = ("config.json", "model_index.json")
_WEIGHT_EXT = (".safetensors", ".bin", ".pth", ".pt")


def _record(path: Path) -> dict[str, Any]:
    return json.loads((path / RECORD).read_text()) if (path / RECORD).is_file() else {}


def _complete_dir(path: Path) -> tuple[bool, str, int]:
    """(complete, why not, bytes) of a model directory."""
    if not path.is_dir():
        return False, f"no directory {path}", 0
    record = path / RECORD
    if record.is_file():
        data = json.loads(record.read_text())
        files = data.get("files", {})
        if not data.get("complete", True):
            return False, f"fetch of {path} did not finish (run it again to resume)", 0
        missing = [name for name, meta in files.items()
                   if not (path / name).is_file() or (path / name).stat().st_size != meta["size"]]
        size = sum(meta["size"] for meta in files.values())
        if missing:
            return False, f"{len(missing)} of {len(files)} files missing or cut short, e.g. {missing[0]}", size
        return True, str(path), size
    names = [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in names)
    if not any(p.name in _CONFIGS for p in names):
        return False, f"{path} holds no config.json or model_index.json", size
    if not any(p.name.endswith(_WEIGHT_EXT) for p in names):
        return False, f"{path} holds no weight file", size
    return True, str(path), size


def _in_hf_cache(repo: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no cache at all)
        return None


def check_weight(w: Weight, verify: bool = False) -> Status:
    if w.url is not None or (w.path.suffix and not w.repo):        # a single file
        if not w.path.is_file():
            return Status(w, "missing", f"no file {w.path}")
        size = w.path.stat().st_size
        if verify and w.url is not None and sha256_file(w.path) != w.url.sha256:
            return Status(w, "incomplete", f"{w.path} does not have the pinned SHA-256", size)
        return Status(w, "present", str(w.path), size)
    ok, detail, size = _complete_dir(w.path)
    record = _record(w.path) if ok else {}
    if ok and record and w.revision and (record.get("commit"), record.get("variant")) != (w.revision, w.variant):
        return Status(w, "incomplete", f"{w.path} holds commit {str(record.get('commit'))[:12]} variant "
                                       f"{record.get('variant')}; the lock pins {w.revision[:12]} variant "
                                       f"{w.variant} (fetch again)", size)
    if ok and verify:
        bad = verify_record(w.path)
        if bad:
            return Status(w, "incomplete", f"{len(bad)} file(s) differ from their digest, e.g. {bad[0]}", size)
    if ok:
        return Status(w, "present", detail, size)
    if w.repo and not w.path.exists():
        cached = _in_hf_cache(w.repo)
        if cached is not None:
            w.in_cache = cached
            return Status(w, "present", f"Hugging Face cache {cached}",
                          sum(p.stat().st_size for p in cached.rglob("*") if p.is_file()))
        return Status(w, "missing", f"not in {w.path} nor in the Hugging Face cache", size)
    return Status(w, "incomplete" if w.path.exists() else "missing", detail, size)


def check(settings: Settings, verify: bool = False) -> Report:
    """Every weight of the settings' backends, and the settings that go with them."""
    report = Report([check_weight(w, verify) for w in required_weights(settings)])
    report.problems += threshold_problems(settings)
    return report


def embedder_name(settings: Settings) -> str:
    """The recorded name the configured embedder will have (without loading it)."""
    b = settings.backends
    opts = interface_options(settings, "embedder")
    if b.embedder == "classical":
        return "classical"
    if b.embedder == "tiny":
        return "tiny:embedder"
    if opts.get("name"):
        return str(opts["name"])
    return f"hf:{opts.get('model') or DEFAULT_MODELS.get(('embedder', b.embedder), b.embedder)}"


def threshold_problems(settings: Settings) -> list[Problem]:
    """The same-individual check needs a threshold calibrated for the configured embedder."""
    if settings.backends.verifier not in ("classical", "vlm"):
        return []
    name = embedder_name(settings)
    try:
        settings.verify.same_individual_threshold(name)
    except Exception as exc:  # noqa: BLE001 - ConfigError with the text to show
        return [Problem(f"same-individual threshold for {name}", str(exc))]
    return []


# ----------------------------------------------------------------------------- fetch

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_id(path: Path) -> str:
    """Git's id of a file's content (what the hub lists for files not stored in LFS)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digest(path: Path, meta: dict[str, Any]) -> bool:
    if meta.get("sha256"):
        return sha256_file(path) == meta["sha256"]
    if meta.get("blob"):
        return git_blob_id(path) == meta["blob"]
    return True


def verify_record(path: Path) -> list[str]:
    """Files of a fetched model whose content no longer matches its recorded digest."""
    files = json.loads((path / RECORD).read_text()).get("files", {}) if (path / RECORD).is_file() else {}
    return [n for n, meta in files.items() if not (path / n).is_file() or not _digest(path / n, meta)]


def wanted_files(names: Iterable[str], variant: str | None = None) -> list[str]:
    """The files of a repository a backend loads: configs, tokenizers and safetensors
    weights (of one precision variant), leaving out other formats and, in a diffusers
    repository, single-file checkpoints beside its component folders."""
    names = list(names)
    diffusers = "model_index.json" in names
    out = []
    for n in names:
        base = n.rsplit("/", 1)[-1]
        if diffusers and "/" not in n and n != "model_index.json":
            continue
        if base.endswith(".safetensors"):
            parts = base.split(".")
            is_variant = len(parts) > 2          # name.<variant>.safetensors
            if variant:
                if not base.endswith(f".{variant}.safetensors"):
                    continue
            elif is_variant:
                continue
            out.append(n)
        elif any(fnmatch.fnmatch(base, p) for p in ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")):
            out.append(n)
    return sorted(out)


class Fetcher:
    """Downloads over HTTP(S) with resumable ``.part`` files. ``endpoint`` is the Hub
    (``HF_ENDPOINT`` or https://huggingface.co); a local server stands in for it in tests."""

    def __init__(self, endpoint: str | None = None, token: str | None = None, retries: int = 5,
                 log: Callable[[str], None] = print, timeout_s: float = 60.0) -> None:
        import requests

        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")
        if token is None:
            try:
                from huggingface_hub import get_token

                token = get_token()
            except ImportError:
                token = None
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "opensubject-models-fetch"
        self.token = token
        self.retries, self.log, self.timeout_s = retries, log, timeout_s

    def _headers(self, url: str) -> dict[str, str]:
        # the token goes to the hub only, never to a redirect target or another host
        if self.token and url.startswith(self.endpoint + "/"):
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def repo_files(self, repo: str, revision: str = "main") -> tuple[str, dict[str, dict[str, Any]]]:
        """(commit, {path: {size, sha256 | blob}}) from the hub's model API."""
        import requests

        url = f"{self.endpoint}/api/models/{repo}/revision/{quote(revision, safe='')}"
        try:
            r = self.session.get(url, params={"blobs": "true"}, headers=self._headers(url), timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            why = "name not resolved" if "NameResolution" in repr(exc) else type(exc).__name__
            raise ModelNotAvailable(f"cannot reach {self.endpoint} ({why}): set HF_ENDPOINT or --endpoint to a "
                                    "mirror this machine reaches, or copy the weights into the models folder "
                                    "(`opensubject models check` lists where)") from None
        if r.status_code in (401, 403):
            raise ModelNotAvailable(f"{repo}: the hub refused access (HTTP {r.status_code}); a gated model "
                                    "needs its licence accepted on the hub and HF_TOKEN set")
        if r.status_code == 404:
            raise ModelNotAvailable(f"{repo}: no such model or revision {revision!r} on {self.endpoint}")
        r.raise_for_status()
        info = r.json()
        files = {}
        for s in info.get("siblings", []):
            lfs = s.get("lfs") or {}
            files[s["rfilename"]] = {"size": int(lfs.get("size", s.get("size") or 0)),
                                     "sha256": lfs.get("sha256"), "blob": None if lfs else s.get("blobId")}
        return str(info.get("sha") or revision), files

    def download(self, url: str, dest: Path, size: int | None, check: Callable[[Path], bool]) -> bool:
        """Fetch url into dest through dest.part, resuming; True when it was downloaded now,
        False when dest was already there and checked."""
        import requests

        if dest.is_file() and (size is None or dest.stat().st_size == size) and check(dest):
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        for attempt in range(1, self.retries + 1):
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have > size:
                part.unlink()
                have = 0
            headers = {**self._headers(url), **({"Range": f"bytes={have}-"} if have else {})}
            try:
                if size is None or have < size:
                    with self.session.get(url, headers=headers, stream=True, timeout=self.timeout_s,
                                          allow_redirects=True) as r:
                        if r.status_code == 416:           # nothing left to send: complete
                            pass
                        else:
                            r.raise_for_status()
                            mode = "ab" if have and r.status_code == 206 else "wb"
                            with open(part, mode) as f:
                                for chunk in r.iter_content(_NET_CHUNK):
                                    f.write(chunk)
                got = part.stat().st_size if part.exists() else 0
                if size is not None and got < size:
                    raise requests.ConnectionError(f"connection ended after {got} of {size} bytes")
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                self.log(f"  {dest.name}: {exc}; resuming (try {attempt} of {self.retries})")
                time.sleep(min(2 ** attempt, 30) * 0.05)
                continue
            if not check(part):
                part.unlink()
                raise ModelNotAvailable(f"{url}: the downloaded file does not match its published digest "
                                        "(deleted; fetch again)")
            os.replace(part, dest)
            return True
        raise ModelNotAvailable(f"{url}: download incomplete after {self.retries} tries; run the fetch "
                                f"again to resume ({part} is kept)")

    def fetch_repo(self, repo: str, dest: Path, variant: str | None = None, revision: str = "main") -> int:
        """Every file a backend loads from the repository, into dest; returns bytes fetched."""
        commit, files = self.repo_files(repo, revision)
        names = wanted_files(files, variant)
        if not any(n.endswith(".safetensors") for n in names):
            raise ModelNotAvailable(f"{repo}: no safetensors weights{' of variant ' + variant if variant else ''} "
                                    "in the repository; fetch it another way")
        record = {"repo": repo, "revision": revision, "commit": commit, "variant": variant, "complete": False,
                  "files": {n: files[n] for n in names}}
        dest.mkdir(parents=True, exist_ok=True)
        (dest / RECORD).write_text(json.dumps(record, indent=1))   # a partial model says so
        total = 0
        for n in names:
            meta = files[n]
            url = f"{self.endpoint}/{repo}/resolve/{commit}/{quote(n)}"
            fresh = self.download(url, dest / n, meta["size"] or None, lambda p, m=meta: _digest(p, m))
            total += meta["size"] if fresh else 0
            self.log(f"  {repo}/{n}: {'fetched' if fresh else 'already there'} ({meta['size'] / 1e6:.1f} MB)")
        (dest / RECORD).write_text(json.dumps(record | {"complete": True}, indent=1))
        return total

    def fetch_url(self, f: UrlFile, dest: Path) -> int:
        fresh = self.download(f.url, dest, None, lambda p: sha256_file(p) == f.sha256)
        self.log(f"  {f.dest}: {'fetched' if fresh else 'already there'}")
        return dest.stat().st_size if fresh else 0


def fetch(settings: Settings, fetcher: Fetcher | None = None) -> Report:
    """Fetch every missing or partial weight of the settings' backends; returns the check after."""
    fetcher = fetcher or Fetcher()
    for w in required_weights(settings):
        status = check_weight(w)
        if status.state == "present":
            fetcher.log(f"{w.label}: present ({status.detail})")
            continue
        if w.url is not None:
            fetcher.log(f"{w.label}: fetching {w.url.url}")
            fetcher.fetch_url(w.url, w.path)
        elif w.repo:
            fetcher.log(f"{w.label}: fetching {w.revision or 'main (not in the lock file)'} into {w.path}")
            fetcher.fetch_repo(w.repo, w.path, w.variant, revision=w.revision or "main")
        else:
            fetcher.log(f"{w.label}: configured as a local path, not a Hub id: put the model there yourself")
    return check(settings)


def lock(settings: Settings, fetcher: Fetcher | None = None, path: Path | None = None) -> dict[str, Pin]:
    """Pin every Hub repository of the settings' backends at the hub's current main: its
    commit, the fp16 variant where the repository publishes one for every weight file
    (unless the settings set a variant) and the bytes of the files fetched. Other
    repositories already in the lock file are kept."""
    fetcher = fetcher or Fetcher()
    pins = load_lock(path)
    for w in required_weights(settings):
        if not w.repo:
            continue
        commit, files = fetcher.repo_files(w.repo, "main")
        variant = interface_variant(settings, w)
        if variant is None and any(i in VARIANT_INTERFACES for i in w.interfaces) and \
                _complete_variant(files, "fp16"):
            variant = "fp16"
        names = wanted_files(files, variant)
        pins[w.repo] = Pin(commit, variant, sum(files[n]["size"] for n in names), len(names))
        fetcher.log(f"{w.repo}: {commit} {variant or 'default precision'}, {pins[w.repo].size / 1e9:.2f} GB")
    write_lock(pins, path)
    return pins


def interface_variant(settings: Settings, w: Weight) -> str | None:
    for i in w.interfaces:
        v = interface_options(settings, i).get("variant")
        if v:
            return str(v)
    return None


def _complete_variant(files: Iterable[str], variant: str) -> bool:
    """Whether every safetensors weight of the repository has a ``variant`` copy."""
    plain = [n for n in wanted_files(files) if n.endswith(".safetensors")]
    have = set(wanted_files(files, variant))
    return bool(plain) and all(n[: -len(".safetensors")] + f".{variant}.safetensors" in have for n in plain)


__all__ = ["AESTHETIC_HEAD", "DEFAULT_MODELS", "Fetcher", "LOCK_FILE", "Pin", "Report", "Status", "UrlFile",
           "Weight", "check", "check_weight", "fetch", "load_lock", "local_model_options", "lock",
           "required_weights", "wanted_files", "write_lock"]
