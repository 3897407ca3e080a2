"""Offline artifacts: ``fused.save(path)`` writes one, ``stfuse.load(path)`` runs it
without the models' classes or the tracing code (docs/artifact.md has the details)::

    manifest.json        format version; stfuse/torch/triton versions; tenants (input
                         specs, pytree specs as JSON); programs; weight views; the
                         size and sha256 of every other file
    plan.json            Plan.record(): groups, stats, passes, graphs for drawing
    weights.safetensors  every weight storage once, as a flat 1-D tensor
    programs/<name>.json the lowered programs calling stfuse:: ops, as torch.export's
                         JSON schema text, weights as graph inputs (no tensors inside)

Programs: ``full`` (all tenants at one batch size), ``full_mixed`` (each at its own
batch size; with two or more dynamic tenants), ``tenant_<i>`` per tenant, and
subsets named at save time; other subsets chain the single-tenant programs.
Each weight is a view (offset, shape, stride) into a saved storage, so packed
``[R, ...]`` group weights and the members' views of them load as one copy.

Security: every byte of an artifact is untrusted. Loading unpickles nothing, hands
torch no archive, and runs no code from the artifact: save.py writes, validate.py
checks (schemas, op allow-list, expression grammar) before load.py deserialises.
"""

from stfuse.errors import ArtifactError

from .format import DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, PLAN, WEIGHTS
from .load import load, read, read_plan
from .save import save
from .validate import check_graph

__all__ = ["ArtifactError", "save", "load", "read", "read_plan", "check_graph", "DTYPES", "FORMAT",
           "FORMAT_VERSION", "MANIFEST", "PLAN", "WEIGHTS"]
