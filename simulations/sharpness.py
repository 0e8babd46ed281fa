"""``fedsam sharpness MODEL``: the top Hessian eigenvalue of a saved model's training loss."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedsam.runtime import resolve_device
from fedsam.data import DATASETS, DataError, load
from fedsam.models import MODELS, build_model
from fedsam.sharpness import evaluation_subset, model_sharpness
from simulations import results
from simulations.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sharpness", help="top Hessian eigenvalue of a saved model", description=__doc__)
    parser.add_argument("model_path", metavar="MODEL", help="a state_dict saved by fedsam run (model.pt)")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the run's, from config.json beside MODEL")
    parser.add_argument("--data-dir", help="default: the run's")
    parser.add_argument("--model", choices=tuple(MODELS), help="architecture (default: the run's)")
    parser.add_argument("--norm", choices=("group", "batch"), help="default: the run's, else group")
    parser.add_argument("--samples", type=int, default=1024, help="training images to measure on (default: 1024)")
    parser.add_argument("--iters", type=int, default=20, help="most Hessian-vector products (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="picks the subset and the start vector (default: 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.model_path)
    if not path.is_file():
        raise UsageError(f"no model file at {path}")
    saved = results.read_config(path.parent) or {}
    dataset = args.dataset or saved.get("dataset")
    data_dir = args.data_dir or saved.get("data-dir")
    architecture = args.model or saved.get("model")
    norm = args.norm or saved.get("norm", "group")
    if not (dataset and data_dir and architecture):
        raise UsageError("give --dataset, --data-dir and --model (no config.json beside the model to read them from)")
    if args.samples < 1 or args.iters < 1:
        raise UsageError("--samples and --iters must be >= 1")
    try:
        data = load(dataset, data_dir)
        device = resolve_device(args.device)
    except (DataError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    model = build_model(architecture, data.num_classes, norm)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - wrong file or wrong architecture, said in one line
        raise UsageError(f"cannot load {path} into a {architecture} for {dataset}: {str(exc).splitlines()[0]}") from None
    model.to(device)
    idx = evaluation_subset(len(data.train_images), args.samples, args.seed)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
    images = (data.train_images[idx].to(device).float() / 255 - mean) / std
    found = model_sharpness(model, images, data.train_labels[idx].to(device), iters=args.iters, seed=args.seed)
    caveat = "" if found.converged else f"; not converged after {found.products} products: raise --iters"
    print(f"λ_max = {found.value:.4f}  ({architecture} on {len(idx)} {dataset} training images, seed {args.seed}"
          f"{caveat})")
    return 0
