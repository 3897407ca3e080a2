"""Artifacts of real architectures: saved, loaded (format 2: checked JSON programs) and
called at another batch size, bit for bit the compiled program's outputs.

A few diverse families keep it short (each save exports four programs); all 32 round-trip
(checked by hand with the same code when the format changed: 2026-11-29)."""

import pytest
import torch

import stfuse
from archs import ARCHS, EXAMPLE_BATCH

pytest.importorskip("safetensors")


def _leaves(out):
    return torch.utils._pytree.tree_leaves(tuple(out.values()) if hasattr(out, "to_tuple") else out)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "deberta_v2", "swin", "wav2vec2"])
def test_round_trip(name, tmp_path):
    arch = ARCHS[name]
    length = arch.lengths[-1]
    models = [arch.make_model(s) for s in (0, 1)]
    fused = stfuse.compile(models, [arch.make_inputs(EXAMPLE_BATCH, length, s) for s in (0, 1)])
    fused.save(tmp_path / name)
    prog = stfuse.load(tmp_path / name)
    args = [arch.make_inputs(3, length, 10 + s) for s in (0, 1)]
    args = [a[0] if len(a) == 1 else a for a in args]
    for got, want in zip(prog(*args), fused(*args)):
        assert type(got) is type(want)
        assert all(torch.equal(g, w) for g, w in zip(_leaves(got), _leaves(want), strict=True))
