"""Conformance through codegen="inductor": real architectures, the fused program compiled by
Inductor, checked against the float64 reference with the tolerance table.

A CI-sized subset (each row compiles one program with Inductor: 8 to 100 s each on
the shared 2-core CPU with a cold Inductor cache): attention with a mask and GELU
(bert), convolutions with folded BatchNorm (resnet), group norm (gn_cnn), and those two
CNNs as one mixed set (grouped ops: members of other shapes). Each is compiled at the
example batch (2) and called at batches 2 and 3: one Inductor compile must serve both
(the batch dim is dynamic). ``STFUSE_CONFORMANCE_INDUCTOR=all`` runs every
architecture and every mixed set of tests/conformance/archs.py instead (tens of
minutes). Deselect with ``-m "not inductor"``.
"""

import os

import pytest

import stfuse

from archs import ARCHS, EXAMPLE_BATCH, KNOWN_FAILURES, MIXES, SEEDS
from conftest import check_tenants

pytest.importorskip("transformers", reason="transformers is in the test extra")

pytestmark = [pytest.mark.slow, pytest.mark.inductor]

ALL = os.environ.get("STFUSE_CONFORMANCE_INDUCTOR") == "all"
FAMILIES = tuple(ARCHS) if ALL else ("bert", "resnet", "gn_cnn")
# mixed sets: name -> architectures (archs.MIXES, or two CNNs: the cheapest grouped set)
MIX_SETS = dict(MIXES) if ALL else {"resnet+gn_cnn": ("resnet", "gn_cnn")}
BATCHES = (EXAMPLE_BATCH, 3)
TUNE = "off"  # every group the matcher forms: as many stfuse ops inside Inductor's graph as can be


def _check(fused, models, inputs) -> None:
    assert fused.plan.stats["fused_groups"] > 0, fused.plan.summary()  # stfuse ops inside Inductor's graph
    for batch in BATCHES:
        check_tenants(fused, models, inputs(batch))
    prog = fused.program
    assert prog.error is None, prog.error  # Inductor ran it: the direct fallback would hide a failure
    assert prog.runs == len(BATCHES) and prog.compiles == 1


def _known(name: str):
    reason = KNOWN_FAILURES.get(name)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_known(n)) for n in FAMILIES])
def test_same_architecture(name):
    arch = ARCHS[name]
    length = arch.lengths[0]
    models = [arch.make_model(s) for s in SEEDS]
    fused = stfuse.compile(models, [arch.make_inputs(EXAMPLE_BATCH, length, s) for s in SEEDS],
                           tune=TUNE, codegen="inductor")
    _check(fused, models, lambda b: [arch.make_inputs(b, length, 10 + s) for s in SEEDS])


@pytest.mark.parametrize("mix", [pytest.param(m, marks=_known(m)) for m in MIX_SETS])
def test_mixed_architectures(mix):
    names = MIX_SETS[mix]
    models = [ARCHS[n].make_model(i) for i, n in enumerate(names)]

    def inputs(batch, seed=0):
        return [ARCHS[n].make_inputs(batch, ARCHS[n].lengths[0], seed + i) for i, n in enumerate(names)]

    fused = stfuse.compile(models, inputs(EXAMPLE_BATCH), tune=TUNE, codegen="inductor")
    _check(fused, models, lambda b: inputs(b, 10))
