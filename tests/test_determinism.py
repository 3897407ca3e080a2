"""The plan does not depend on Python's hash seed: the same models compile to the same
groups, epilogues and program text in two processes with different PYTHONHASHSEED
(set iteration order is the usual way such nondeterminism creeps into passes)."""

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, torch, stfuse
    from stfuse import zoo

    torch.manual_seed(0)
    models = {"a": zoo.mlp(16, 32, 8), "b": zoo.mlp(16, 32, 8), "c": zoo.cnn(4), "d": zoo.cnn(4)}
    examples = {"a": torch.randn(2, 16), "b": torch.randn(2, 16),
                "c": torch.randn(2, 3, 8, 8), "d": torch.randn(2, 3, 8, 8)}
    fused = stfuse.compile(models, examples)
    record = fused.plan.record()
    print(json.dumps({"groups": record["groups"], "tenants": record["tenants"],
                      "stats": {k: v for k, v in fused.plan.stats.items() if k != "self_check"},
                      "program": fused.canonical_program.code}))
""")


def _plan(seed: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONHASHSEED"] = seed
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_plan_is_the_same_under_two_hash_seeds():
    one, two = _plan("0"), _plan("12345")
    assert one["groups"], "nothing fused: the comparison would prove little"
    assert one == two
