"""The pure-Python layout of :meth:`fbackprop.Explanation.to_svg` when Graphviz is not
installed: boxes in layers by depth, layers folded into bands."""

from __future__ import annotations

import collections
import math


# ------------------------------------------------------------- graph layout
# Sizes of the pure-Python SVG layout, in pixels.
NODE_CHARS = 40          # a box's text lines wrap at this many characters
_CHAR_W, _LINE_H, _PAD = 7.0, 15, 8
_LABEL_H = 15            # an edge label's height
_GAP_X = 24              # between boxes of a layer
_BAND_GAP = 40           # between bands
_PORT_X, _PORT_STEP = 24, 36   # where edges leave and enter a box (from its left side)
_LANE_STEP = 10          # between the runs of edges that do not go to the next layer
_TITLE_H = 40
_ASPECT = 1.2            # the width/height the bands aim at


class _Layout:
    """Where the pure-Python SVG puts boxes, edges and labels.

    Each node gets a layer, its depth from the inputs (an input sits just above
    its first use). Layers go top to bottom; when there are many, they are cut
    into bands placed side by side (like newspaper columns), as many as make
    the picture about ``_ASPECT`` times as wide as high. An edge to the next
    layer of the same band is a curve; any other edge leaves its box on the
    right into a lane of its own, runs down (to a later band: up to a channel
    above the bands, across, and down in front of that band), then across the
    gap above its target and into it. Each label sits in that gap, beside the
    point where its edge enters the target, on a row where no other label is:
    gaps hold no boxes and grow with their rows, so no label is hidden.

    Attributes:
      boxes: node -> {"lines", "kind", "x", "y", "w", "h"}.
      paths: per edge, ``(svg path, label)``.
      labels: ``(x, y, width, text)`` per labelled edge.
      width, height: the picture's size.
    """

    def __init__(self, nodes, edges, texts):
        boxes = self.boxes = {}
        for node in nodes:
            lines, kind = texts[node]
            boxes[node] = {"lines": lines, "kind": kind,
                           "w": max(len(s) for s in lines) * _CHAR_W + 2 * _PAD,
                           "h": len(lines) * _LINE_H + 2 * _PAD}
        depth = self._depths(nodes, edges)
        layers = [[] for _ in range(max(depth.values(), default=0) + 1)]
        # In a layer: operations first (in program order, so a chain runs down
        # one line), then inputs.
        for node in sorted(nodes, key=lambda n: n[0] in ("in", "elided")):
            layers[depth[node]].append(node)
        layers = [layer for layer in layers if layer]
        depth = {n: k for k, layer in enumerate(layers) for n in layer}
        bands = self._bands(layers)
        # Inputs of a band's first layer sit above it, not at the previous band's end.
        for b in range(len(bands) - 1):
            last = layers[bands[b][-1]]
            moved = [n for n in last if n[0] in ("in", "elided")]
            if moved:
                last[:] = [n for n in last if n not in moved]
                layers.append(moved)
                bands[b + 1].insert(0, len(layers) - 1)
        bands = [[d for d in band if layers[d]] for band in bands]
        order = [d for band in bands for d in band]
        layers = [layers[d] for d in order]
        position = {d: k for k, d in enumerate(order)}
        bands = [[position[d] for d in band] for band in bands]
        depth = {n: k for k, layer in enumerate(layers) for n in layer}
        band_of = {n: b for b, band in enumerate(bands) for d in band for n in layers[d]}
        # Where each edge enters its target: left to right in argument order.
        port = {}
        incoming = collections.defaultdict(list)
        for i, edge in enumerate(edges):
            incoming[edge[1]].append(i)
        for dst, ids in incoming.items():
            for slot, i in enumerate(sorted(ids, key=lambda i: edges[i][3])):
                port[i] = min(_PORT_X + slot * _PORT_STEP, boxes[dst]["w"] - 8)
        direct = {i for i, (src, dst, _, _) in enumerate(edges)
                  if band_of[src] == band_of[dst] and depth[dst] == depth[src] + 1}
        # x, band by band: boxes left-aligned, then labels, then lanes.
        label_at, label_rows, lane_x = {}, collections.defaultdict(list), {}
        left = 20.0
        self.band_left = []
        for b, band in enumerate(bands):
            self.band_left.append(left)
            right = left
            for d in band:
                x = left
                for n in layers[d]:
                    boxes[n]["x"] = x
                    x += boxes[n]["w"] + _GAP_X
                right = max(right, x - _GAP_X)
            for i, (src, dst, label, _) in enumerate(edges):
                if label and band_of[dst] == b:
                    text = f"grad {label}"
                    x, w = boxes[dst]["x"] + port[i] + 5, len(text) * _CHAR_W + 6
                    rows = label_rows[depth[dst]]
                    row = next((k for k, taken in enumerate(rows)
                                if all(x >= hi or x + w <= lo for lo, hi in taken)),
                               len(rows))
                    if row == len(rows):
                        rows.append([])
                    rows[row].append((x, x + w))
                    label_at[i] = (row, x, w, text)
                    right = max(right, x + w)
            lanes = [i for i, (src, dst, _, _) in enumerate(edges)
                     if band_of[src] == b and i not in direct]
            for k, i in enumerate(lanes):
                lane_x[i] = right + 14 + k * _LANE_STEP
            left = right + (14 + len(lanes) * _LANE_STEP if lanes else 0) + _BAND_GAP
        self.width = max(left - _BAND_GAP + 20, 600.0)
        # y: a channel per edge into a later band, then each band's layers, each
        # under the gap holding its labels.
        crossing = [i for i, (src, dst, _, _) in enumerate(edges)
                    if band_of[src] != band_of[dst]]
        channel = {i: _TITLE_H + 4 + k * _LANE_STEP for k, i in enumerate(crossing)}
        top = _TITLE_H + 14 + len(crossing) * _LANE_STEP
        gap_top, bottom = {}, top
        for band in bands:
            y = top
            for d in band:
                gap_top[d] = y
                y += max(30.0, len(label_rows[d]) * (_LABEL_H + 3) + 14)
                for n in layers[d]:
                    boxes[n]["y"] = y
                y += max(boxes[n]["h"] for n in layers[d])
            bottom = max(bottom, y)
        self.height = bottom + 30
        # The edges and labels.
        self.paths, self.labels = [], []
        for i, (src, dst, label, _) in enumerate(edges):
            a, b = boxes[src], boxes[dst]
            px, py = b["x"] + port[i], b["y"]
            run_y = py - 12
            if i in label_at:
                row, lx, w, text = label_at[i]
                ly = gap_top[depth[dst]] + 7 + row * (_LABEL_H + 3)
                self.labels.append((lx, ly, w, text))
                run_y = ly + _LABEL_H / 2
            if i in direct:
                sx, sy = a["x"] + min(_PORT_X, a["w"] - 8), a["y"] + a["h"]
                dy = max(12.0, (py - sy) / 2)
                path = (f"M {sx:.1f} {sy:.1f} C {sx:.1f} {sy + dy:.1f}, {px:.1f} "
                        f"{py - dy:.1f}, {px:.1f} {py:.1f}")
            else:
                sx, sy, lx = a["x"] + a["w"], a["y"] + a["h"] / 2, lane_x[i]
                points = [(sx, sy), (lx, sy)]
                if i in channel:
                    entry = self.band_left[band_of[dst]] - 8 - (crossing.index(i) % 4) * 5
                    points += [(lx, channel[i]), (entry, channel[i]), (entry, run_y)]
                else:
                    points.append((lx, run_y))
                points += [(px, run_y), (px, py)]
                path = "M " + " L ".join(f"{x:.1f} {y:.1f}" for x, y in points)
            self.paths.append((path, label))

    @staticmethod
    def _depths(nodes, edges) -> dict:
        preds, succs = collections.defaultdict(list), collections.defaultdict(list)
        for src, dst, _, _ in edges:
            preds[dst].append(src)
            succs[src].append(dst)
        depth = {}
        for node in nodes:                   # nodes are in topological order
            depth[node] = 1 + max((depth[p] for p in preds[node] if p in depth), default=-1)
        # A value sits just above its first use (a bias's broadcast beside the add
        # that reads it, an input above the operation that first reads it).
        for node in reversed(nodes):
            if succs[node]:
                lowest = min(depth[s] for s in succs[node]) - 1
                depth[node] = lowest if node[0] in ("in", "elided") \
                    else max(depth[node], lowest)
        return depth

    def _bands(self, layers) -> list[list[int]]:
        """Consecutive layers cut into bands of about equal height."""
        heights = [max([self.boxes[n]["h"] for n in layer] + [0]) + 40 for layer in layers]
        widths = [sum(self.boxes[n]["w"] + _GAP_X for n in layer) for layer in layers]
        total, band_w = sum(heights), max(widths + [1.0]) + 80
        count = max(1, min(len(layers), round(math.sqrt(_ASPECT * total / band_w))))
        target = total / count
        bands, current, height = [], [], 0.0
        for d, h in enumerate(heights):
            if current and height + h / 2 > target and len(bands) < count - 1:
                bands.append(current)
                current, height = [], 0.0
            current.append(d)
            height += h
        bands.append(current)
        return bands
