"""Checks of drawn figures shared by the plot and report tests."""

from __future__ import annotations

import itertools


def text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts of *fig* (tick labels, axis labels, titles,
    annotations, legend entries) whose boxes intersect, as drawn by the renderer."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = list(fig.texts)
    for ax in fig.axes:
        for axis, (low, high) in ((ax.xaxis, sorted(ax.get_xlim())),
                                  (ax.yaxis, sorted(ax.get_ylim()))):
            tolerance = 1e-9 * (high - low)
            texts += [label for loc, label in zip(axis.get_majorticklocs(),
                                                  axis.get_majorticklabels())
                      if low - tolerance <= loc <= high + tolerance]  # the ticks drawn
        texts += ax.texts
        texts += [ax.xaxis.label, ax.yaxis.label, ax.title]
        legend = ax.get_legend()
        if legend is not None:
            texts += legend.get_texts()
    for legend in fig.legends:
        texts += legend.get_texts()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts
             if t.get_visible() and t.get_text().strip()]
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
            if box_a.overlaps(box_b)]
