#!/usr/bin/env python
"""Install detectron2 into the running interpreter's environment.

detectron2 is not published on PyPI under its own name. Order of attempts:

1. upstream: ``pip install --no-build-isolation git+https://github.com/facebookresearch/detectron2``
   (what users with internet run; tried only when GitHub answers within a few seconds);
2. registry: the ``pb1-detectron2==0.6`` sdist (a re-upload of detectron2 v0.6), pinned by sha256,
   made installable and compatible with current numpy / Pillow / setuptools by a few checked
   source edits, and installed without its C++ extension (the sdist does not ship
   ``detectron2/layers/csrc``). A pure-Python ``detectron2/_C`` answers the version queries and
   raises a clear error for the ops that need the extension (rotated boxes, deformable conv,
   the fast COCO evaluator); ``mcl_det`` detects this and picks the fallbacks itself.

Idempotent: when a working detectron2 is importable it prints what it found and exits in about a
second. Standard library only: it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

UPSTREAM = "git+https://github.com/facebookresearch/detectron2.git"
REGISTRY_NAME = "pb1-detectron2"
REGISTRY_VERSION = "0.6"
REGISTRY_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
MARKER = "_mcl_det_build.txt"  # written into the installed package by the registry path

# (file, old, new): exact source edits; each must match, so a changed sdist fails loudly.
PATCHES: list[tuple[str, str, str]] = [
    # Pillow >= 10 removed Image.LINEAR (it was an alias of BILINEAR).
    ("detectron2/data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR"),
    # numpy >= 1.24 removed the np.str/np.int/np.float/np.bool aliases. Reading the split file
    # line by line also fixes the 0-d array crash on a split with a single id.
    (
        "detectron2/data/datasets/pascal_voc.py",
        "fileids = np.loadtxt(f, dtype=np.str)",
        "fileids = [line.strip() for line in f if line.strip()]",
    ),
    (
        "detectron2/evaluation/pascal_voc_evaluation.py",
        ".astype(np.bool)",
        ".astype(bool)",
    ),
    ("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.int)", "dtype=np.int64)"),
    ("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.float)", "dtype=np.float64)"),
    ("detectron2/evaluation/sem_seg_evaluation.py", ".astype(np.float)", ".astype(np.float64)"),
    # setuptools >= 81 no longer ships pkg_resources.
    ("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", ""),
    (
        "detectron2/model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", '
        'os.path.join("configs", config_path)\n    )',
        'cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)',
    ),
]

STUB_C = '''"""Stand-in for detectron2's C++ extension, which this build does not have.

Written by mcl_det's tools/install_detectron2.py.

Standard Faster/Mask R-CNN use torchvision's roi_align and nms and do not need it. Rotated boxes,
deformable convolution and the fast COCO evaluator do; they raise the error below.
"""

MCL_DET_STUB = True


def get_compiler_version():
    return "none (detectron2 installed without its C++ extension)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"detectron2._C.{name} needs detectron2's C++ extension, which this install does not have "
        "(pb1-detectron2 sdist without csrc). Rotated boxes, deformable conv and the fast COCO "
        "evaluator are unavailable; install detectron2 from source to use them."
    )
'''

SETUP_PY = """# Written by mcl_det's tools/install_detectron2.py: the sdist's own setup.py builds a
# C++ extension from sources the sdist lacks and installs a stray top-level "tools" package.
from setuptools import find_packages, setup

setup(
    name="pb1-detectron2",
    version="0.6",
    packages=find_packages(include=("detectron2", "detectron2.*")),
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    include_package_data=False,
)
"""


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def pip(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    return subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)


def probe() -> tuple[str, bool] | None:
    """Return (version, has_extension) of an importable detectron2, checked in a subprocess."""
    code = (
        "import detectron2, detectron2.modeling, detectron2.engine;"
        "from detectron2 import _C;"
        "print(detectron2.__version__, int(not getattr(_C, 'MCL_DET_STUB', False)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    version, ext = r.stdout.split()[-2:]
    return version, ext == "1"


def github_reachable(timeout: float = 4.0) -> bool:
    try:
        with socket.create_connection(("github.com", 443), timeout=timeout):
            return True
    except OSError:
        return False


def install_upstream() -> bool:
    log(f"trying upstream: pip install --no-build-isolation {UPSTREAM}")
    if not github_reachable():
        log("github.com is unreachable; skipping upstream")
        return False
    try:
        r = pip("install", "--no-build-isolation", UPSTREAM, timeout=1800)
    except subprocess.TimeoutExpired:
        log("upstream install timed out")
        return False
    if r.returncode != 0:
        log("upstream install failed:\n" + r.stderr[-2000:])
    return r.returncode == 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def registry_source(work: Path) -> Path:
    """Download the pinned sdist into ``work``, check its sha256, patch it; return its folder."""
    spec = f"{REGISTRY_NAME}=={REGISTRY_VERSION}"
    log(f"fetching the registry sdist {spec} (sha256 {REGISTRY_SHA256[:12]}...)")
    flags = ("--no-deps", "--no-build-isolation", "--no-binary", ":all:")
    r = pip("download", *flags, spec, "-d", str(work))
    sdists = list(work.glob("pb1[-_]detectron2-*.tar.gz"))
    if r.returncode != 0 or not sdists:
        raise SystemExit(f"error: could not download {spec} from the registry:\n{r.stderr[-2000:]}")
    digest = sha256(sdists[0])
    if digest != REGISTRY_SHA256:
        raise SystemExit(f"error: {sdists[0].name} has sha256 {digest}, expected {REGISTRY_SHA256}")
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(work, filter="data")
    src = next(p for p in work.iterdir() if p.is_dir() and (p / "detectron2").is_dir())
    for rel, old, new in PATCHES:
        f = src / rel
        text = f.read_text()
        if old not in text:
            raise SystemExit(f"error: patch for {rel} does not apply (pattern {old!r} not found)")
        f.write_text(text.replace(old, new))
    (src / "detectron2" / "_C.py").write_text(STUB_C)
    (src / "detectron2" / MARKER).write_text(
        f"{spec} sha256={REGISTRY_SHA256}; C++ extension: absent (pure-Python _C stub)\n"
    )
    (src / "setup.py").write_text(SETUP_PY)
    for extra in ("setup.cfg", "pyproject.toml"):
        if (src / extra).exists():
            (src / extra).unlink()
    n_configs = len(list((src / "detectron2" / "model_zoo" / "configs").rglob("*.yaml")))
    log(f"patched {len(PATCHES)} source lines; {n_configs} model-zoo configs included")
    return src


def install_registry(work: Path) -> None:
    r = pip("install", "--no-build-isolation", "--no-deps", str(registry_source(work)))
    if r.returncode != 0:
        raise SystemExit(f"error: pip could not install the patched sdist:\n{r.stderr[-3000:]}")


def build_registry_wheel(work: Path, wheel_dir: Path) -> Path:
    """The patched registry build as a pure-Python wheel, for a machine without the registry (a
    cluster node, the lent GPU machine): ``pip install --no-deps`` it there."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    src = registry_source(work)
    r = pip("wheel", "--no-build-isolation", "--no-deps", str(src), "-w", str(wheel_dir))
    wheels = sorted(wheel_dir.glob("pb1_detectron2-*.whl"))
    if r.returncode != 0 or not wheels:
        raise SystemExit(f"error: pip could not build the wheel:\n{r.stderr[-3000:]}")
    return wheels[-1]


def extension(found: tuple) -> str:
    """What ``probe()`` found about the C++ extension, for the log."""
    return f"C++ extension: {'present' if found[1] else 'absent (pure-Python fallbacks)'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--source",
        choices=("auto", "upstream", "registry"),
        default="auto",
        help="auto: upstream when GitHub is reachable, else the registry sdist",
    )
    ap.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    ap.add_argument(
        "--wheel",
        metavar="DIR",
        type=Path,
        help="build the patched registry version as a wheel into DIR instead of installing it "
        "(to install on a machine without the registry: pip install --no-deps DIR/pb1_*.whl)",
    )
    args = ap.parse_args()
    if args.wheel is not None:
        work = Path(tempfile.mkdtemp(prefix="mcl_det_d2_"))
        try:
            log(f"wrote {build_registry_wheel(work, args.wheel)}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0

    found = probe()
    if found and not args.force:
        log(f"detectron2 {found[0]} already installed; {extension(found)}")
        return 0
    if args.force:
        pip("uninstall", "-y", "detectron2", REGISTRY_NAME)

    ok = False
    if args.source in ("auto", "upstream"):
        ok = install_upstream()
        if not ok and args.source == "upstream":
            print("error: upstream detectron2 install failed", file=sys.stderr)
            return 2
    if not ok:
        work = Path(tempfile.mkdtemp(prefix="mcl_det_d2_"))
        try:
            install_registry(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    found = probe()
    if not found:
        print(
            "error: detectron2 was installed but does not import; see the log above",
            file=sys.stderr,
        )
        return 2
    where = "upstream" if ok else f"registry {REGISTRY_NAME}=={REGISTRY_VERSION} (patched)"
    log(f"installed detectron2 {found[0]} from {where}; {extension(found)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
