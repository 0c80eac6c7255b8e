"""The wheels the GPU image lacks: fetched or built on a CPU machine (``--prepare``, into wheels/,
carried to the GPU machine) and unpacked there (``--install-carried``, into .gpu_suite_site)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from .common import SITE, WHEELS

# Wheels the GPU image lacks. (distribution, version or None = the CPU venv's version, kind):
# "binary" -> pip download for cp312/manylinux_2_28, "build" -> pip wheel --no-deps,
# "if-missing" -> installed on the GPU only when the image does not have it.
CARRIED = [
    ("megatron-core", "0.16.1", "binary"),
    ("deepspeed", "0.19.8", "build"),
    ("pydantic", "2.14.3", "binary"),
    ("pydantic-core", None, "binary"),       # the exact version pydantic's METADATA pins
    ("annotated-types", None, "binary"),
    ("typing-inspection", None, "binary"),
    ("typing-extensions", None, "binary"),   # pydantic 2.14 needs a newer one than torch's floor
    ("hjson", None, "binary"),               # deepspeed imports these at `import deepspeed`
    ("msgpack", None, "binary"),
    ("py-cpuinfo", None, "binary"),
    ("ninja", None, "binary"),
    ("tqdm", None, "if-missing"),
    ("packaging", None, "if-missing"),
    ("einops", None, "if-missing"),
]
IF_MISSING_IMPORT = {"tqdm": "tqdm", "packaging": "packaging", "einops": "einops"}
CARRY_LIMIT_MIB = 60
# pip does not widen one --platform to older manylinux tags: name them (pydantic-core is 2_17).
PLATFORMS = [a for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                           "manylinux_2_5_x86_64", "manylinux1_x86_64") for a in ("--platform", tag)]

# ============================================================================ preparation (CPU)

def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _wheel_dist(path: Path) -> tuple[str, str]:
    parts = path.name.split("-")
    return _norm(parts[0]), parts[1]


def _venv_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _pydantic_core_pin(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist: pydantic-core"):
                return line.split("==")[1].split(";")[0].strip()
    raise RuntimeError(f"{wheel.name} does not pin pydantic-core")


def prepare(dest: Path = WHEELS) -> int:
    dest.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    have = {_wheel_dist(p): p for p in dest.glob("*.whl")}

    def present(dist, ver):
        return any(d == _norm(dist) and v == ver for d, v in have)

    for dist, ver, kind in CARRIED:
        if dist == "pydantic-core":
            ver = _pydantic_core_pin(next(p for (d, _), p in have.items() if d == "pydantic"))
        ver = ver or _venv_version(dist)
        if present(dist, ver):
            print(f"have {dist}=={ver}")
            continue
        spec = f"{dist}=={ver}"
        if kind == "build":
            cmd = [*pip, "wheel", "--no-deps", "-w", str(dest), spec]
            if subprocess.run(cmd).returncode != 0:  # its setup.py may want torch at build time
                subprocess.run([*cmd[:3], "--no-build-isolation", *cmd[3:]], check=True)
        else:
            subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                            "--implementation", "cp", *PLATFORMS, "-d", str(dest), spec],
                           check=True)
        have = {_wheel_dist(p): p for p in dest.glob("*.whl")}
    wanted = set()
    for dist, ver, _ in CARRIED:  # drop stale versions of the carried distributions
        matches = sorted((p for (d, _), p in have.items() if d == _norm(dist)), key=lambda p: p.stat().st_mtime)
        wanted.add(matches[-1])
    for p in dest.glob("*.whl"):
        if p not in wanted:
            p.unlink()
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    for p in sorted(dest.glob("*.whl")):
        print(f"{p.stat().st_size / 2**20:7.2f} MiB  {p.name}")
    print(f"carried: {len(wanted)} wheels, {total / 2**20:.1f} MiB in {dest} (limit {CARRY_LIMIT_MIB} MiB)")
    return 0 if total <= CARRY_LIMIT_MIB * 2**20 else 1


# ============================================================================ installation (GPU)

def _installed(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _unzip_wheel(wheel: Path, site: Path) -> None:
    """Install a wheel by unpacking it (what pip does for purelib/platlib wheels)."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = name.split("/")
            if parts[0].endswith(".data") and len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                target = site.joinpath(*parts[2:])
            elif parts[0].endswith(".data"):
                continue
            else:
                target = site / name
            if name.endswith("/"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))


def install_carried(site: Path = SITE, wheels: Path = WHEELS) -> dict:
    t0 = time.perf_counter()
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise RuntimeError(f"no wheels in {wheels}: run --prepare on a CPU machine and carry 'wheels'")
    chosen, skipped = [], []
    for w in files:
        dist, ver = _wheel_dist(w)
        pretty = next((d for d, _, k in CARRIED if _norm(d) == dist), dist)
        kind = next((k for d, _, k in CARRIED if _norm(d) == dist), "binary")
        if kind == "if-missing" and _installed(pretty):
            skipped.append(f"{pretty} (image has {_installed(pretty)})")
            continue
        chosen.append(w)
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
           "--disable-pip-version-check", "--target", str(site), *map(str, chosen)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    how = "pip install --no-deps --no-index --target"
    if proc.returncode != 0:
        how = f"zip (pip failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]})"
        for w in chosen:
            _unzip_wheel(w, site)
    return {"status": "ok", "how": how, "site": str(site), "installed": [w.name for w in chosen],
            "skipped": skipped, "carried_mib": round(sum(w.stat().st_size for w in files) / 2**20, 2),
            "seconds": round(time.perf_counter() - t0, 1)}
