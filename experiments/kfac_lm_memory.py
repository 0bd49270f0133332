"""Optimizer-state bytes on a byte-level-style language model: K-FAC against Adam, Shampoo, SOAP.

The model (flax.nnx): a ``[V, D]`` embedding table, two pre-LayerNorm blocks (causal
``nnx.MultiHeadAttention`` on ``[B, T, D]`` activations, a ``D -> 4D -> D`` GELU MLP), a final
LayerNorm and an untied ``[D, V]`` head; V = 8192, D = 128, 4 heads (2.5M parameters). State
bytes are :func:`jaxopt2.state_memory` (``jax.eval_shape`` of ``init``: nothing allocated),
in float32. K-FAC is measured three ways: without the memory bounds (every side full, the
shape rule's slots for every rank-2 and rank-3 leaf), with the default ``max_factor_dim``
(shape rule), and with the default ``max_factor_dim`` and the layer plan of
:func:`jaxopt2.kfac_layers` (factors for the found layers alone: attention included, the
embedding table excluded).

Run: ``python experiments/kfac_lm_memory.py [--vocab 8192] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import flax.nnx as nnx
import jax
import optax

import jaxopt2


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        mask = nnx.make_causal_mask(h[..., 0])
        h = h + self.attn(self.ln1(h), mask=mask)
        return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))


class LM(nnx.Module):
    def __init__(self, vocab: int, d: int, heads: int, blocks: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(blocks)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def make(vocab: int = 8192, d: int = 128, heads: int = 4, blocks: int = 2):
    """The model's ``(params, loss_fn(params, tokens))``: next-token cross-entropy."""
    graph, params = nnx.split(LM(vocab, d, heads, blocks, nnx.Rngs(0)))

    def loss_fn(p, tokens):
        logits = nnx.merge(graph, p)(tokens[:, :-1])
        logits = jaxopt2.tag_loss("softmax_cross_entropy", logits, tokens[:, 1:])
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return per_token.mean()  # the mean over every token: what the tag implies

    return params, loss_fn


def measure(vocab: int = 8192, d: int = 128, batch: int = 2, seq: int = 9) -> dict[str, int]:
    params, loss_fn = make(vocab, d)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0, vocab)
    with contextlib.redirect_stdout(io.StringIO()):
        plan = jaxopt2.kfac_layers(loss_fn, params, tokens)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opts = {
        "adam": optax.adam(1e-3),
        "kfac_unbounded": jaxopt2.kfac(max_factor_dim=10**9),
        "kfac": jaxopt2.kfac(),
        "kfac_plan": jaxopt2.kfac(layers=plan),
        "shampoo": jaxopt2.shampoo(1e-3),
        "soap": jaxopt2.soap(1e-3),
    }
    out = {"params": sum(x.size for x in jax.tree.leaves(params))}
    out.update({name: jaxopt2.state_memory(opt, shapes) for name, opt in opts.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    row = measure(args.vocab)
    print(f"vocab {args.vocab}: {row['params']:,} parameters")
    for name, size in row.items():
        if name != "params":
            print(f"  {name:15s} {size / 2**20:9.1f} MiB  {size / row['adam']:6.2f}x adam")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
