"""Conformance through codegen="inductor": real architectures, the fused program compiled by
Inductor, checked against the float64 reference with the tolerance table.

A CI-sized subset (each row compiles one program with Inductor, seconds to tens of
seconds on 2 cores): one family per kind of op stfuse groups (attention with a mask,
rotary attention with grouped KV heads, convolutions with folded BatchNorm, group norm,
patches) and one mixed set. Each is compiled at the example batch (2) and called at
batches 2 and 3: one Inductor compile must serve both (the batch dim is dynamic).
Deselect with ``-m "not inductor"``.
"""

import pytest

import stfuse

from archs import ARCHS, EXAMPLE_BATCH, MIXES, SEEDS
from conftest import check_tenants

pytest.importorskip("transformers", reason="transformers is in the test extra")

pytestmark = [pytest.mark.slow, pytest.mark.inductor]

FAMILIES = ("bert", "llama", "resnet", "gn_cnn", "vit")
MIX = "bert+vit+wav2vec2"  # three architectures: grouped where they differ, across kinds
BATCHES = (EXAMPLE_BATCH, 3)


def _check(fused, models, inputs) -> None:
    for batch in BATCHES:
        check_tenants(fused, models, inputs(batch))
    prog = fused.program
    assert prog.error is None, prog.error  # Inductor ran it: the direct fallback would hide a failure
    assert prog.runs == len(BATCHES) and prog.compiles == 1


@pytest.mark.parametrize("name", FAMILIES)
def test_same_architecture(name):
    arch = ARCHS[name]
    length = arch.lengths[0]
    models = [arch.make_model(s) for s in SEEDS]
    fused = stfuse.compile(models, [arch.make_inputs(EXAMPLE_BATCH, length, s) for s in SEEDS],
                           codegen="inductor")
    _check(fused, models, lambda b: [arch.make_inputs(b, length, 10 + s) for s in SEEDS])


def test_mixed_architectures():
    names = MIXES[MIX]
    models = [ARCHS[n].make_model(i) for i, n in enumerate(names)]

    def inputs(batch, seed=0):
        return [ARCHS[n].make_inputs(batch, ARCHS[n].lengths[0], seed + i) for i, n in enumerate(names)]

    fused = stfuse.compile(models, inputs(EXAMPLE_BATCH), codegen="inductor")
    _check(fused, models, lambda b: inputs(b, 10))
