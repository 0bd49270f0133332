"""PyHessian's top-5 Hessian eigenvalues of the digits MLP, run in the PyTorch peer environment.

Usage (with the interpreter of experiments/results/peer_envs/torch, see setup_peers.sh):

    python experiments/peers/pyhessian_top5.py INPUTS.npz [--top-n 5] [--tol 1e-4]
    python experiments/peers/pyhessian_top5.py INPUTS.npz --serve

INPUTS.npz holds ``x`` (float32 [N, 64]), ``y`` (int64 [N]) and the MLP weights
``w1, b1, w2, b2, w3, b3`` stored ``(fan_in, fan_out)`` (the JAX layout); they are transposed
into ``nn.Linear``'s ``(out, in)``. The loss is ``nn.CrossEntropyLoss()`` (mean over the
batch), the function the JAX side differentiates.

One run: ``hessian(model, criterion, data=(x, y), cuda=False)`` builds the gradient graph
(timed as ``construct_s``), then ``eigenvalues(top_n=..., tol=...)`` runs power iteration with
deflation (timed as ``eigenvalues_s``). Each run uses a fresh object and a fresh random start,
so its number of iterations varies. Hessian-vector products are counted by wrapping
PyHessian's own product function (a counter increment, negligible next to a product).

Without ``--serve``: one cold run (it includes PyTorch's one-time warm-up) and
``--warm-repeats`` warm runs, printed as one JSON object. With ``--serve`` the script prints
one JSON line ``{"ready": ...}`` and then answers each line ``run`` on its standard input with
one run as a JSON line, until end of input; the caller times other work in between, so both
sides see the same background load (interleaved repeats).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn


def build_model(arrays) -> nn.Module:
    widths = [arrays["w1"].shape[0], arrays["w1"].shape[1], arrays["w2"].shape[1]]
    num_classes = arrays["w3"].shape[1]
    model = nn.Sequential(
        nn.Linear(widths[0], widths[1]),
        nn.Tanh(),
        nn.Linear(widths[1], widths[2]),
        nn.Tanh(),
        nn.Linear(widths[2], num_classes),
    )
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, name in zip(linears, ("1", "2", "3"), strict=True):
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(arrays[f"w{name}"].T)))
            layer.bias.copy_(torch.from_numpy(arrays[f"b{name}"]))
    return model


class Runner:
    def __init__(self, inputs: str, top_n: int, tol: float):
        arrays = dict(np.load(inputs))
        self.x = torch.from_numpy(arrays["x"])
        self.y = torch.from_numpy(arrays["y"]).long()
        self.model = build_model(arrays)
        self.criterion = nn.CrossEntropyLoss()
        self.top_n, self.tol = top_n, tol
        # The package re-exports the class under its submodule's name: fetch the module.
        self.module = importlib.import_module("pyhessian.hessian")
        self.num_hvp = 0
        original = self.module.hessian_vector_product

        def counted(*a, **kw):
            self.num_hvp += 1
            return original(*a, **kw)

        self.module.hessian_vector_product = counted

    def info(self) -> dict:
        with torch.no_grad():
            loss = float(self.criterion(self.model(self.x), self.y))
        return {
            "peer": "pyhessian",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loss": loss,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "top_n": self.top_n,
            "tol": self.tol,
        }

    def run(self) -> dict:
        self.num_hvp = 0
        t0 = time.perf_counter()
        h = self.module.hessian(self.model, self.criterion, data=(self.x, self.y), cuda=False)
        t1 = time.perf_counter()
        eigenvalues, _ = h.eigenvalues(top_n=self.top_n, tol=self.tol)
        t2 = time.perf_counter()
        del h
        # Drop the create_graph gradients so every run starts from the same state.
        self.model.zero_grad(set_to_none=True)
        return {
            "construct_s": t1 - t0,
            "eigenvalues_s": t2 - t1,
            "total_s": t2 - t0,
            "num_hvp": self.num_hvp,
            "eigenvalues_raw": [float(e) for e in eigenvalues],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs")
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)"
    )
    args = parser.parse_args()

    # PyHessian calls backward(create_graph=True), which warns about a reference cycle; the
    # runner drops those gradients after every run, so the warning is noise here.
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    runner = Runner(args.inputs, args.top_n, args.tol)

    if args.serve:
        print(json.dumps({"ready": True, **runner.info()}), flush=True)
        for line in sys.stdin:
            if line.strip() == "run":
                print(json.dumps(runner.run()), flush=True)
        return

    runs = [runner.run() for _ in range(1 + args.warm_repeats)]
    print(json.dumps({**runner.info(), "cold": runs[0], "warm": runs[1:]}))


if __name__ == "__main__":
    main()
