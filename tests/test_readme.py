"""The README's code runs as written."""

from __future__ import annotations

import re

import torch
from torch import nn

from tests.helpers import ROOT


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_plain_pytorch_sam_loop_runs_and_learns():
    block = next(b for b in _python_blocks() if "FirstPassStats(model, closure)" in b)

    class MyNet(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    torch.manual_seed(0)
    x = torch.randn(64, 3, 2, 2)
    y = (x.mean((1, 2, 3)) > 0).long()
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)] * 15
    scope = {"MyNet": MyNet, "loader": loader}
    exec(compile(block, "README.md", "exec"), scope)
    model = scope["model"]
    assert int(model[2].num_batches_tracked) == len(loader)  # one count per SAM step, not two
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_the_plug_in_snippet_names_real_functions():
    block = next(b for b in _python_blocks() if "from fedsam.optim import build, register" in b)
    assert "build(\"sam\"" in block and "register(" in block


def test_the_first_commands_cover_a_machine_without_network_or_gpu():
    """Ready to copy: the offline run (no --download) and the CPU-only PyTorch that spares ~6 GB of CUDA wheels."""
    first = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    lines = [line for line in first.splitlines() if not line.startswith("#")]
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in lines
    offline = next(line for line in lines if "--data-dir ../shared/data/cifar10-subset" in line)
    assert offline.startswith("fedsam run ") and "--download" not in offline
    assert len((ROOT / "README.md").read_text().splitlines()) < 300
