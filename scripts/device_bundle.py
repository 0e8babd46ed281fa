"""Pack Flower, Ray and the rest of fedsam's engine for a lent GPU machine that has no network.

The lent machine (docs/performance.md, part f) brings its own Python, torch, numpy and pandas, but
not Flower or Ray, and a call may carry at most 64 MiB. This installs this environment's exact
versions of ``flwr[simulation]`` and ``flwr-datasets`` for the machine's Python into a folder,
drops what the machine already has or a simulation never imports (Ray's Java jars, RLlib, Serve,
Tune, Train, the dashboard's web client, the ``uv`` binary), and packs the rest as one ``.tar.xz``
under ``.devcarry/`` (ignored by git; the device tool carries it with ``carry: [".devcarry"]``).

    python -m scripts.device_bundle                     # for the H200 image's Python 3.12
    python -m scripts.device_bundle --python 3.11       # to try the bundle on this machine

``scripts/device_bench.sh`` unpacks it on the machine and runs the GPU parts of ``fedsam bench``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: The distributions whose versions the bundle pins to this environment's: the engine fedsam runs on.
ENGINE = ("flwr[simulation]", "flwr-datasets")

#: Large distributions the lent machine's image already holds (the device tool's KINDS.md), and
#: ``uv``, a binary nothing here runs: the bundle leaves them out, so the machine's own are imported.
ON_THE_MACHINE = ("numpy", "pyarrow", "pandas", "matplotlib", "fonttools", "pillow", "kiwisolver", "contourpy",
                  "uvloop", "hf-xet", "pygments", "uv")

#: Parts of Ray that ``ray.init``, actors and Flower's simulation engine never import.
RAY_UNUSED = ("jars", "rllib", "serve", "tune", "train", "llm", "data", "dashboard/client")

#: What one call may carry in all (the device tool's limit), less room for the working tree.
CARRY_LIMIT_BYTES = 60 * 2**20

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def pinned_environment() -> list[str]:
    """``name==version`` for every distribution here, so that the bundle resolves to what the tests ran on."""
    return sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() != "fedsam"})


def install(target: Path, python: str, constraints: Path) -> None:
    requirements = [f"{name}=={importlib.metadata.version(name.split('[')[0])}" for name in ENGINE]
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), "--python-version", python,
               "--implementation", "cp", "--only-binary=:all:", "--constraint", str(constraints)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + requirements, check=True)


def uninstall(site: Path, distribution: str) -> None:
    """Every file a distribution's ``RECORD`` lists, and the folders that leaves empty."""
    for info in site.glob(f"{distribution.replace('-', '_')}-*.dist-info"):
        folders = set()
        for line in (info / "RECORD").read_text().splitlines():
            relative = line.split(",")[0]
            while relative.startswith("../"):  # scripts: ../../bin/x in RECORD, bin/x under --target
                relative = relative[3:]
            path = site / relative
            if path.is_file() or path.is_symlink():
                path.unlink()
                folders.update(path.parents)
        shutil.rmtree(info, ignore_errors=True)
        for folder in sorted((f for f in folders if site in f.parents), key=lambda f: len(f.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def prune(site: Path) -> None:
    for distribution in ON_THE_MACHINE:
        uninstall(site, distribution)
    for part in RAY_UNUSED:
        shutil.rmtree(site / "ray" / part, ignore_errors=True)
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the lent machine's Python, major.minor (default 3.12)")
    parser.add_argument("--out", default=".devcarry/site.tar.xz", help="the archive to write")
    args = parser.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="fedsam-bundle-") as scratch:
        constraints = Path(scratch) / "constraints.txt"
        constraints.write_text("\n".join(pinned_environment()) + "\n")
        site = Path(scratch) / "site"
        print(f"installing {', '.join(ENGINE)} for Python {args.python} into {site} ...", flush=True)
        install(site, args.python, constraints)
        prune(site)
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"packing {out} (xz, a minute or two) ...", flush=True)
        with tarfile.open(out, "w:xz", preset=9) as archive:
            for entry in sorted(site.iterdir()):
                archive.add(entry, arcname=entry.name)
    size = out.stat().st_size
    print(f"wrote {out}: {size / 2**20:.1f} MiB")
    if size > CARRY_LIMIT_BYTES:
        print(f"error: over the {CARRY_LIMIT_BYTES // 2**20} MiB a device call can carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
