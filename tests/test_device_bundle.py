"""``scripts/device_bundle.py`` leaves out only what the lent machine has or a simulation never imports."""

from __future__ import annotations

from scripts.device_bundle import ON_THE_MACHINE, RAY_UNUSED, pinned_environment, prune


def test_prune_drops_the_machines_packages_and_unused_ray_keeping_the_engine(tmp_path):
    kept = ["flwr/__init__.py", "flwr-1.42.0.dist-info/METADATA", "ray/_private/worker.py", "ray/util/actor_pool.py",
            "ray/dashboard/agent.py", "grpc/__init__.py", "bin/flwr"]
    records = {"pillow-13.0.0.dist-info": ["PIL/Image.py", "pillow.libs/libjpeg.so"],  # a folder named unlike it
               "numpy-2.4.6.dist-info": ["numpy/__init__.py", "numpy/linalg/_umath.so"],
               "uv-0.13.9.dist-info": ["bin/uv"]}
    dropped = ["ray/jars/ray.jar", "ray/rllib/__init__.py", "ray/dashboard/client/build/index.html",
               "flwr/__pycache__/x.pyc"]
    for info, files in records.items():
        dropped += files + [f"{info}/RECORD"]
        (tmp_path / info).mkdir()
        listed = [f"../../{f}" if f.startswith("bin/") else f for f in files]  # as pip writes a script's path
        (tmp_path / info / "RECORD").write_text("".join(f"{f},sha256=x,1\n" for f in listed + [f"{info}/RECORD"]))
    for path in kept + dropped:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        if not (tmp_path / path).exists():
            (tmp_path / path).write_text("")
    prune(tmp_path)
    assert all((tmp_path / p).exists() for p in kept)
    assert not any((tmp_path / p).exists() for p in dropped)
    assert not any((tmp_path / d).exists() for d in ("PIL", "pillow.libs", "numpy", *records))
    assert "flwr" not in ON_THE_MACHINE and "_private" not in RAY_UNUSED


def test_the_bundle_pins_this_environments_engine():
    pins = pinned_environment()
    assert any(p.startswith("flwr==") for p in pins) and any(p.startswith("ray==") for p in pins)
    assert not any(p.lower().startswith("fedsam==") for p in pins)
