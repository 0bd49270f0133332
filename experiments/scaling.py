"""Scaling: optimizer-state memory and collective traffic per device, 10M to 10B parameters.

What it measures, for ``optax.adam``, ``jaxopt2.shampoo``, ``jaxopt2.soap`` and
``jaxopt2.kfac`` on dense tanh MLPs (``L`` square layers of width ``d`` with biases, a squared
error tagged for K-FAC), on meshes of 8, 32 and 256 simulated CPU devices in two layouts:

* ``dp``: mesh ``(data=N, model=1)``, parameters replicated, the batch split over ``data``;
* ``fsdp``: mesh ``(data=N/8, model=8)``, every parameter sharded over ``model`` along its
  largest dimension divisible by 8 (the first of equal ones), the batch split over both axes.

The optimizer state is laid out by :func:`jaxopt2.state_sharding` (param-shaped subtrees follow
the parameters; Shampoo's and SOAP's per-block stacks — statistics, roots / bases, SOAP's
blocked second moment — split along their block rows over all devices, each device owning its
blocks; everything else replicated). Two numbers per cell:

1. **Memory.** ``jaxopt2.state_memory`` with ``jax.ShapeDtypeStruct`` parameters (from
   ``jax.eval_shape``: nothing is allocated): the optimizer state's bytes on the fullest
   device, next to the parameters' bytes per device.
2. **Communication.** One training step (``jaxopt2.value_and_update`` then
   ``optax.apply_updates``) is jitted with the parameters', state's and batch's shardings as
   ``in_shardings``/``out_shardings`` and lowered from ShapeDtypeStructs under
   ``jax.set_mesh(mesh)``, compiled (never run), and the compiled per-device HLO is read: for
   every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute the bytes of
   its result shape (all tuple elements; for ``*-start`` async pairs the output buffer, the
   ``*-done`` half not counted again) are summed. That is the buffer each device receives per
   op, not the bytes on the wire (a ring all-reduce sends about twice its size). Ops are split
   by the computation they sit in: ``every_step`` (outside any ``conditional``) and
   ``in_cond`` (inside a ``lax.cond`` branch or anything it calls: Shampoo/SOAP's periodic
   refresh, K-FAC's periodic inversion and damping adaptation), so ``every_step`` is what a
   step without refresh moves and ``every_step + in_cond`` bounds a step where every branch
   fires. Ops inside a ``while`` body (counted once each) are reported too (``in_while``).

Model sizes (``L * (d^2 + d)`` parameters, float32): 10M = d 1024, L 10 (10,496,000);
1B = d 4096, L 60 (1,006,878,720); 10B = d 8192, L 150 (10,067,558,400). Batch: 4 rows per
device (shapes only). Shampoo and SOAP: block 1024, refresh every 10 steps and
``max_precondition_dim=8192`` (so the 8192-wide layers are preconditioned too; the default
4096 would leave them to the grafted Adam); K-FAC: ``invert_every=10``.

Compiling is the slow part (SPMD partitioning of the whole step on 2 cores): by default the
communication is compiled for the 10M and 1B models on every mesh and for the 10B model is
left out (its 150 layers make the largest programs; see ``missing`` in the JSON), while memory
is computed for every cell. ``--compile-sizes`` chooses. Errors (a failed compile, an
optimizer that refuses a layout) are recorded in the cell and the run goes on.

Run (from the repository root)::

    python experiments/scaling.py            # all memory cells, collectives for 10M and 1B
    python experiments/scaling.py --quick    # 10M and 1B on 8 and 32 devices only
    python experiments/scaling.py --compile-sizes 10M,1B,10B   # everything (much longer)
    python experiments/scaling.py --models 10B --devices 8 --compile-sizes 10B \
        --optimizers shampoo --merge   # a few cells, merged into the written results

Prints one JSON line per cell and writes ``experiments/results/scaling.json`` and
``experiments/results/scaling.md`` (the table) unless ``--no-write``. Time on 2 CPU cores:
the default run took 21 minutes (``wall_s`` in the JSON), most of it the 256-device
Shampoo/SOAP compiles of the 1B model (about 5 minutes each in the ``dp`` layout).

Analytic cross-check (not used as a measurement): Adam's state is ``2 * 4 * P`` bytes
(``mu``, ``nu``), divided by 8 under ``fsdp``; data-parallel gradients are all-reduced once per
step, so ``dp`` Adam's ``every_step`` should be about ``4 * P`` bytes.
"""

from __future__ import annotations

import os

_DEVICES = 256
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES}"
).strip()

from jaxopt2.cpu import apply_cpu_deadlock_workaround  # noqa: E402

apply_cpu_deadlock_workaround()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxopt2  # noqa: E402
from jaxopt2.sharding import state_sharding  # noqa: E402

MODELS = {"10M": (1024, 10), "1B": (4096, 60), "10B": (8192, 150)}  # name: (width, layers)
DEVICE_COUNTS = (8, 32, 256)
LAYOUTS = ("dp", "fsdp")
MODEL_AXIS = 8
ROWS_PER_DEVICE = 4
OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-3),
    "shampoo": lambda: jaxopt2.shampoo(
        1e-3, block_size=1024, precondition_every=10, max_precondition_dim=8192
    ),
    "soap": lambda: jaxopt2.soap(
        3e-3, block_size=1024, precondition_every=10, max_precondition_dim=8192
    ),
    "kfac": lambda: jaxopt2.kfac(invert_every=10),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
GB = 1e9
OUT = Path(__file__).parent / "results"


def param_shapes(width: int, layers: int) -> dict[str, jax.ShapeDtypeStruct]:
    shapes = {}
    for i in range(layers):
        shapes[f"w{i:03d}"] = jax.ShapeDtypeStruct((width, width), jnp.float32)
        shapes[f"b{i:03d}"] = jax.ShapeDtypeStruct((width,), jnp.float32)
    return shapes


def loss_fn(params, x, y):
    h = x
    names = sorted(k for k in params if k.startswith("w"))
    for i, k in enumerate(names):
        h = h @ params[k] + params["b" + k[1:]]
        if i < len(names) - 1:
            h = jnp.tanh(h)
    out = jaxopt2.tag_loss("squared_error", h, y)
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def make_mesh(n: int, layout: str):
    shape = (n, 1) if layout == "dp" else (n // MODEL_AXIS, MODEL_AXIS)
    return jax.make_mesh(
        shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:n]
    )


def param_spec(shape: tuple[int, ...], layout: str) -> P:
    if layout == "dp":
        return P()
    dims = [i for i, s in enumerate(shape) if s % MODEL_AXIS == 0]
    if not dims:
        return P()
    best = max(dims, key=lambda i: (shape[i], -i))
    return P(*("model" if i == best else None for i in range(len(shape))))


def shard_bytes(tree, shardings) -> int:
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    return sum(
        math.prod(s.shard_shape(tuple(x.shape))) * jnp.dtype(x.dtype).itemsize
        for x, s in zip(leaves, shards, strict=True)
    )


# --- reading collectives out of compiled HLO ---------------------------------------------

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}  # fmt: skip
_SHAPE = re.compile(r"\b(pred|[sufc]\d+|bf16)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(
    r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\(")


def _shapes_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _SHAPE.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * _ITEMSIZE.get(dtype, 4))
    return out


def _callees(line: str) -> list[str]:
    names = _CALLS.findall(line)
    for group in _BRANCHES.findall(line):
        names += [g.strip().lstrip("%") for g in group.split(",") if g.strip()]
    return names


def collective_bytes(hlo: str) -> dict:
    """Result bytes of the collectives in compiled HLO text, split by where they sit."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
        elif current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)

    def reach(roots: list[str]) -> set[str]:
        seen, todo = set(), list(roots)
        while todo:
            c = todo.pop()
            if c in seen or c not in comps:
                continue
            seen.add(c)
            for line in comps[c]:
                todo += _callees(line)
        return seen

    cond_roots, while_roots = [], []
    for lines in comps.values():
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            if m.group(2) == "conditional":
                cond_roots += _callees(line)
            elif m.group(2) == "while":
                while_roots += _callees(line)
    in_cond, in_while = reach(cond_roots), reach(while_roots)

    totals = {"every_step": 0, "in_cond": 0, "in_while": 0}
    by_kind: dict[str, dict[str, int]] = {}
    count = {"every_step": 0, "in_cond": 0}
    for name, lines in comps.items():
        where = "in_cond" if name in in_cond else "every_step"
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            op = m.group(2)
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            sizes = _shapes_bytes(m.group(1))
            if op in ("all-gather-start", "collective-permute-start") and len(sizes) >= 2:
                sizes = [sizes[1]]  # (operand, output, ...): the output buffer
            nbytes = sum(sizes)
            totals[where] += nbytes
            count[where] += 1
            if name in in_while:
                totals["in_while"] += nbytes
            by_kind.setdefault(where, {}).setdefault(kind, 0)
            by_kind[where][kind] += nbytes
    return {**totals, "ops": count, "by_kind": by_kind}


# --- one cell ----------------------------------------------------------------------------


def measure(opt_name: str, model: str, n: int, layout: str, compile_hlo: bool) -> dict:
    width, layers = MODELS[model]
    params = param_shapes(width, layers)
    mesh = make_mesh(n, layout)
    pshard = {k: NamedSharding(mesh, param_spec(v.shape, layout)) for k, v in params.items()}
    row = {
        "optimizer": opt_name,
        "model": model,
        "width": width,
        "layers": layers,
        "params": sum(math.prod(v.shape) for v in params.values()),
        "devices": n,
        "layout": layout,
        "mesh": dict(mesh.shape),
        "param_bytes_per_device": shard_bytes(params, pshard),
    }
    optimizer = OPTIMIZERS[opt_name]()
    t0 = time.perf_counter()
    try:
        row["state_bytes_per_device"] = jaxopt2.state_memory(optimizer, params, pshard)
    except Exception as e:  # recorded, not hidden
        row["state_error"] = f"{type(e).__name__}: {e}"[:2000]
    row["memory_s"] = round(time.perf_counter() - t0, 2)
    if not compile_hlo:
        return row

    t0 = time.perf_counter()
    try:
        sshard = state_sharding(optimizer, params, pshard)
        batch = ROWS_PER_DEVICE * n
        data = NamedSharding(mesh, P(("data", "model")))
        rep = NamedSharding(mesh, P())
        x = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=data)
        y = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=data)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
        p_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=pshard[k])
                for k, v in params.items()}  # fmt: skip

        def step(params, state, x, y, key):
            value, updates, state = jaxopt2.value_and_update(
                optimizer, loss_fn, params, state, x, y, key=key
            )
            return optax.apply_updates(params, updates), state, value

        with jax.set_mesh(mesh):
            state = jax.eval_shape(optimizer.init, params)
            s_in = jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, sshard
            )
            fn = jax.jit(
                step,
                in_shardings=(pshard, sshard, data, data, rep),
                out_shardings=(pshard, sshard, rep),
            )
            lowered = fn.lower(p_in, s_in, x, y, key)
            row["lower_s"] = round(time.perf_counter() - t0, 2)
            hlo = lowered.compile().as_text()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["collective_bytes"] = collective_bytes(hlo)
    except Exception as e:  # recorded, not hidden
        row["compile_error"] = f"{type(e).__name__}: {e}"[:2000]
        row["compile_traceback_tail"] = traceback.format_exc()[-1500:]
        row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


# --- table --------------------------------------------------------------------------------


def _gb(v) -> str:
    return "—" if v is None else (f"{v / GB:.3g}" if v >= 1e6 else f"{v / GB:.2g}")


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | layout | devices | params GB/dev | adam state | shampoo state | soap state "
        "| kfac state | adam coll. | shampoo coll. | soap coll. | kfac coll. |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    cells = {(r["model"], r["layout"], r["devices"], r["optimizer"]): r for r in rows}
    lines = []
    for model in MODELS:
        for layout in LAYOUTS:
            for n in DEVICE_COUNTS:
                group = [cells.get((model, layout, n, o)) for o in OPTIMIZERS]
                if not any(group):
                    continue
                first = next(r for r in group if r)
                mem = [_gb(r.get("state_bytes_per_device")) if r else "—" for r in group]
                coll = []
                for r in group:
                    c = (r or {}).get("collective_bytes")
                    if c:
                        coll.append(f"{_gb(c['every_step'])} (+{_gb(c['in_cond'])})")
                    elif r and "compile_error" in r:
                        coll.append("error")
                    else:
                        coll.append("—")
                lines.append(
                    f"| {model} | {layout} | {n} | {_gb(first['param_bytes_per_device'])} | "
                    + " | ".join(mem) + " | " + " | ".join(coll) + " |"
                )  # fmt: skip
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10M and 1B on 8 and 32 devices")
    ap.add_argument("--compile-sizes", default="10M,1B", help="models whose step is compiled")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--models", default=None, help="only these models (e.g. 10B)")
    ap.add_argument("--devices", default=None, help="only these device counts (e.g. 8,32)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="replace these cells in the written results and keep the others",
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    assert jax.device_count() >= _DEVICES, jax.device_count()
    models = ["10M", "1B"] if args.quick else list(MODELS)
    counts = (8, 32) if args.quick else DEVICE_COUNTS
    if args.models:
        models = args.models.split(",")
    if args.devices:
        counts = tuple(int(n) for n in args.devices.split(","))
    compile_sizes = set(args.compile_sizes.split(",")) if args.compile_sizes else set()
    optimizers = args.optimizers.split(",")
    start = time.perf_counter()
    rows, missing = [], []
    for model in models:
        for layout in LAYOUTS:
            for n in counts:
                for opt_name in optimizers:
                    compile_hlo = model in compile_sizes
                    row = measure(opt_name, model, n, layout, compile_hlo)
                    if not compile_hlo:
                        missing.append(f"{opt_name} {model} {layout} {n}: collectives not compiled")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    wall = time.perf_counter() - start
    runs = [{"argv": sys.argv[1:], "wall_s": round(wall, 1)}]
    if args.merge and (OUT / "scaling.json").exists():
        old = json.loads((OUT / "scaling.json").read_text())
        cell = lambda r: (r["optimizer"], r["model"], r["layout"], r["devices"])
        new = {cell(r) for r in rows}
        grid = [(o, m, lay, n) for m in MODELS for lay in LAYOUTS for n in DEVICE_COUNTS
                for o in OPTIMIZERS]  # fmt: skip
        kept = [r for r in old["rows"] if cell(r) not in new]
        rows = sorted(kept + rows, key=lambda r: grid.index(cell(r)))
        done = {f"{o} {m} {lay} {n}" for (o, m, lay, n) in new if m in compile_sizes}
        missing = [x for x in old["missing"] if x.rsplit(":", 1)[0] not in done] + [
            x for x in missing if x not in old["missing"]
        ]
        runs = old.get("runs", [{"argv": old["settings"]["argv"], "wall_s": old["wall_s"]}]) + runs
        wall = sum(r["wall_s"] for r in runs)
    result = {
        "description": __doc__.split("\n")[0],
        "settings": {
            "models": {k: {"width": w, "layers": n} for k, (w, n) in MODELS.items()},
            "rows_per_device": ROWS_PER_DEVICE,
            "model_axis": MODEL_AXIS,
            "optimizers": {
                "adam": "optax.adam(1e-3)",
                "shampoo": "jaxopt2.shampoo(1e-3, block_size=1024, precondition_every=10, "
                "max_precondition_dim=8192)",
                "soap": "jaxopt2.soap(3e-3, block_size=1024, precondition_every=10, "
                "max_precondition_dim=8192)",
                "kfac": "jaxopt2.kfac(invert_every=10)",
            },
            "argv": {"quick": args.quick, "compile_sizes": sorted(compile_sizes)},
        },
        "platform": {
            "jax": jax.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "wall_s": round(wall, 1),
        "runs": runs,
        "missing": missing,
        "rows": rows,
    }
    print(json.dumps({"wall_s": result["wall_s"], "missing": len(missing)}))
    if not args.no_write:
        OUT.mkdir(exist_ok=True)
        (OUT / "scaling.json").write_text(json.dumps(result, indent=1) + "\n")
        (OUT / "scaling.md").write_text(
            "State: optimizer-state GB per device (`jaxopt2.state_memory`). Coll.: GB of "
            "collective results per device per step, every step (+ inside `lax.cond` "
            "branches: the periodic refresh).\n\n" + markdown(rows)
        )


if __name__ == "__main__":
    main()
