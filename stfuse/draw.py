"""Draw a fusion plan: the tenants' graphs side by side, fused groups across them.

``fused.plan.draw("plan.png")`` (or ``stfuse inspect ARTIFACT --draw plan.png``).
Reads only ``Plan.record()`` data, so a loaded artifact draws the same picture.
Needs matplotlib (the ``plot`` extra); the format follows the file suffix
(png, svg, pdf). SVG keeps its text as text, so names can be searched.

Layout: one column per tenant; rows follow a longest-path layering of the
graph in which each fused group is one node, so a group's members share a row
and a coloured bar joins them across the columns. Views and parameters are
left out (their edges are followed through), so rows are operators.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from .errors import StfuseError

COLORS = {"linear": "#4c72b0", "conv2d": "#55a868", "layer_norm": "#dd8452", "group_norm": "#c44e52",
          "pointwise": "#8172b3",
          "input": "#ffffff", "output": "#ffffff"}
OTHER = "#b0b0b0"
COL_W, BOX_W, BOX_H = 3.0, 2.3, 0.62


def _unit_key(tenant: str, i: int, unit: dict):
    return ("group", unit["group"]) if unit["group"] else ("node", tenant, i)


def layout(record: dict) -> dict:
    """(tenant, unit index) -> row. Layers are a longest-path layering of the graph in
    which a group is one node; within a layer each group takes its own row (shared
    by its members), and a tenant's unfused units take the rows its groups leave free."""
    g = nx.DiGraph()
    for t, tg in record["tenants"].items():
        units = tg["nodes"]
        g.add_nodes_from(_unit_key(t, i, u) for i, u in enumerate(units))
        g.add_edges_from((_unit_key(t, a, units[a]), _unit_key(t, b, units[b])) for a, b in tg["edges"])
    try:
        order = list(nx.topological_sort(g))
    except nx.NetworkXUnfeasible:  # cannot happen for a verified plan; keep each tenant's order
        return {(t, i): i for t, tg in record["tenants"].items() for i in range(len(tg["nodes"]))}
    layer = {}
    for k in order:
        layer[k] = max((layer[p] + 1 for p in g.predecessors(k)), default=0)
    sub = {}  # unit key -> row within its layer
    for lay in range(max(layer.values(), default=-1) + 1):
        groups = sorted({k for k in order if layer[k] == lay and k[0] == "group"}, key=order.index)
        sub.update({k: j for j, k in enumerate(groups)})
        for t, tg in record["tenants"].items():
            taken = {sub[_unit_key(t, i, u)] for i, u in enumerate(tg["nodes"])
                     if u["group"] and layer[_unit_key(t, i, u)] == lay}
            free = (j for j in range(len(taken) + len(tg["nodes"])) if j not in taken)
            for i, u in enumerate(tg["nodes"]):
                if not u["group"] and layer[_unit_key(t, i, u)] == lay:
                    sub[_unit_key(t, i, u)] = next(free)
    height = {}
    for k, lay in layer.items():
        height[lay] = max(height.get(lay, 0), sub[k] + 1)
    start, top = {}, 0
    for lay in sorted(height):
        start[lay], top = top, top + height[lay]
    return {(t, i): start[layer[k]] + sub[k] for t, tg in record["tenants"].items()
            for i, u in enumerate(tg["nodes"]) for k in [_unit_key(t, i, u)]}


def draw_plan(record: dict, path, *, title: str | None = None, dpi: int = 110) -> Path:
    """Write the drawing of a plan record to ``path``; returns the path."""
    try:
        from matplotlib import rc_context
        from matplotlib.figure import Figure
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    except ImportError as err:
        raise StfuseError("drawing a plan needs matplotlib: pip install 'stfuse[plot]'") from err
    path = Path(path)
    tenants = list(record["tenants"])
    rows = layout(record)
    n_rows = max(rows.values(), default=0) + 1
    s = record["stats"]
    title = title or (f"stfuse plan: {s['tenants']} tenants, {s['fused_groups']} fused groups, "
                      f"launches {s['launches_before']} -> {s['launches_after']}, "
                      f"coverage {s['coverage']:.0%}")
    width, height = 1.2 + COL_W * len(tenants) * 0.9, 1.6 + 0.42 * n_rows

    with rc_context({"svg.fonttype": "none", "font.size": 8}):
        fig = Figure(figsize=(width, height))
        ax = fig.add_axes((0.02, 0.01, 0.96, 1 - 1.1 / height))
        ax.set_xlim(-COL_W / 2, COL_W * (len(tenants) - 0.5) + 0.6)
        ax.set_ylim(-(n_rows - 0.4), 1.0)
        ax.axis("off")
        fig.suptitle(title, fontsize=10, y=1 - 0.25 / height)

        def xy(t, i):
            return tenants.index(t) * COL_W, -rows[(t, i)]

        for c, t in enumerate(tenants):
            ax.text(c * COL_W, 0.75, t, ha="center", va="center", fontsize=10, fontweight="bold")
        # Groups: a bar across the member columns, behind the boxes, named at its right end.
        spans: dict[str, list] = {}
        for t, tg in record["tenants"].items():
            for i, u in enumerate(tg["nodes"]):
                if u["group"]:
                    spans.setdefault(u["group"], []).append(xy(t, i))
        for gid, pts in spans.items():
            xs, y = [p[0] for p in pts], pts[0][1]
            color = COLORS.get(next(u["op_class"] for tg in record["tenants"].values()
                                    for u in tg["nodes"] if u["group"] == gid), OTHER)
            ax.add_patch(FancyBboxPatch((min(xs) - BOX_W / 2 - 0.12, y - BOX_H / 2 - 0.1),
                                        max(xs) - min(xs) + BOX_W + 0.24, BOX_H + 0.2,
                                        boxstyle="round,pad=0.02", fc=color, ec=color, alpha=0.25, zorder=1))
            ax.text(max(xs) + BOX_W / 2 + 0.18, y, gid, ha="left", va="center", fontsize=7, color=color)
        for t, tg in record["tenants"].items():
            for a, b in tg["edges"]:
                (x0, y0), (x1, y1) = xy(t, a), xy(t, b)
                # Edges that skip rows bow out to the left, at most about a box's half width.
                rad = 0.0 if y0 - y1 <= 1 else min(0.35, 1.6 / (y0 - y1))
                ax.add_patch(FancyArrowPatch((x0, y0 - BOX_H / 2), (x1, y1 + BOX_H / 2), arrowstyle="-|>",
                                             mutation_scale=7, lw=0.6, color="#555555",
                                             connectionstyle=f"arc3,rad={rad}", zorder=2))
            for i, u in enumerate(tg["nodes"]):
                x, y = xy(t, i)
                fused = bool(u["group"])
                ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                                            boxstyle="round,pad=0.02,rounding_size=0.12",
                                            fc=COLORS.get(u["op_class"], OTHER) if fused else "#f4f4f4",
                                            ec=COLORS.get(u["op_class"], OTHER) if fused else "#666666",
                                            lw=1.4 if fused else 0.7, zorder=3))
                label = u["label"] if len(u["label"]) <= 22 else u["label"][:21] + "~"
                ax.text(x, y, label, ha="center", va="center", zorder=4,
                        color="white" if fused else "black", fontsize=7)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return path
