"""FLOPs of a compiled program with every trip of its loops counted.

XLA's ``compiled.cost_analysis()["flops"]`` counts the body of a while loop
once, whatever its trip count: a ``lax.scan`` over 64 layers costs one layer
there. That is fine to compare programs with the same loops, but not a
program that runs a scan as two shorter scans (as a memory-budget plan may)
against one that does not. This module reads the compiled HLO text and
counts like XLA's ``HloCostAnalysis`` - a dot ``2 x output x contracted``
elements, a convolution ``2 x output x kernel / output features``, other
arithmetic one per output element (transcendental functions not counted, as
XLA counts them apart), reductions their input, data movement nothing -
but multiplies each loop body by its ``known_trip_count``. With
``trips=False`` every trip count is taken as 1, which reproduces
``cost_analysis()["flops"]`` (tests check it).
"""

from __future__ import annotations

import re

_ELEMENTWISE = frozenset({
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "remainder", "and",
    "or", "xor", "not", "negate", "abs", "sign", "compare", "select", "clamp", "convert",
    "floor", "ceil", "round-nearest-afz", "round-nearest-even", "is-finite",
    "shift-left", "shift-right-logical", "shift-right-arithmetic", "popcnt",
    "count-leading-zeros", "real", "imag", "complex", "stochastic-convert",
})
_TRANSCENDENTAL = frozenset({
    "exponential", "log", "tanh", "rsqrt", "sqrt", "logistic", "cosine", "sine", "tan",
    "exponential-minus-one", "log-plus-one", "atan2", "cbrt", "erf", "power",
})
_REDUCE = frozenset({"reduce", "reduce-window", "select-and-scatter", "scatter"})

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\) -> .*\{\s*$")
_SHAPE = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(shape: str) -> list[int]:
    m = _SHAPE.match(shape)
    if not m or not m.group(1):
        return []
    return [int(d) for d in m.group(1).split(",")]


def _size(shape: str) -> int:
    n = 1
    for d in _dims(shape):
        n *= d
    return n


def _split_shape(rest: str) -> tuple[str, str]:
    """(shape, remainder) of an instruction's right-hand side."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    k = rest.find(" ")
    return rest[:k], rest[k + 1:]


def _operands(text: str) -> tuple[list[str], str]:
    """The operand names inside the leading parentheses, and the attributes after."""
    assert text.startswith("(")
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            inner, attrs = text[1:i], text[i + 1:]
            break
    names = re.findall(r"%([\w.\-]+)", inner)
    return names, attrs


def _parse(text: str) -> dict:
    """computation name -> list of (name, shape, opcode, operands, attrs)."""
    comps: dict = {}
    current = None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = comps.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        s = line.strip()
        if s == "}":
            current = None
            continue
        if s.startswith("ROOT "):
            s = s[5:]
        if not s.startswith("%") or " = " not in s:
            continue
        name, rest = s[1:].split(" = ", 1)
        shape, rest = _split_shape(rest)
        k = rest.find("(")
        if k < 0:
            continue
        opcode = rest[:k]
        operands, attrs = _operands(rest[k:])
        current.append((name, shape, opcode, operands, attrs))
    return comps


def _attr_list(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([0-9,]*)\}", attrs)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{?([%\w.\-, ]+)\}?", attrs)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def compiled_flops(compiled, trips: bool = True) -> float:
    """FLOPs of a ``jax.stages.Compiled`` (or its HLO text), each loop body times
    its trip count (``trips=False``: once, like ``cost_analysis``)."""
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    comps = _parse(text)
    shapes = {c: {name: shape for name, shape, *_ in instrs} for c, instrs in comps.items()}
    memo: dict = {}

    def cost(comp: str) -> float:
        if comp in memo:
            return memo[comp]
        memo[comp] = 0.0
        total = 0.0
        table = shapes.get(comp, {})
        for name, shape, op, operands, attrs in comps.get(comp, ()):
            if op == "dot":
                lhs = _dims(table.get(operands[0], ""))
                k = 1
                for d in _attr_list(attrs, "lhs_contracting_dims"):
                    k *= lhs[d] if d < len(lhs) else 1
                total += 2.0 * _size(shape) * k
            elif op == "convolution":
                rhs = table.get(operands[1], "")
                labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
                rdims = _dims(rhs)
                out_feat = 1
                if labels and "o" in labels.group(1) and rdims:
                    out_feat = rdims[labels.group(1).index("o")]
                total += 2.0 * _size(shape) * (_size(rhs) / max(out_feat, 1))
            elif op == "fusion":
                total += sum(cost(c) for c in _called(attrs, "calls"))
            elif op == "while":
                m = _TRIP.search(attrs)
                n = int(m.group(1)) if (m and trips) else 1
                body = _called(attrs, "body") + _called(attrs, "condition")
                total += n * sum(cost(c) for c in body)
            elif op in ("call", "async-start"):
                total += sum(cost(c) for c in _called(attrs, "to_apply") + _called(attrs, "calls"))
            elif op == "conditional":
                branches = _called(attrs, "branch_computations") or (
                    _called(attrs, "true_computation") + _called(attrs, "false_computation"))
                total += max((cost(c) for c in branches), default=0.0)
            elif op in _REDUCE:
                src = table.get(operands[0], "") if operands else ""
                total += max(_size(src) - _size(shape), 0) if op == "reduce" else _size(src)
            elif op in _ELEMENTWISE:
                total += _size(shape)
        memo[comp] = total
        return total

    entry = None
    for line in text.splitlines():
        if line.startswith("ENTRY "):
            entry = _HEADER.match(line).group(1)
            break
    return cost(entry) if entry else 0.0
