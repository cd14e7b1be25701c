"""Facts about what XLA compiled, read from the optimized HLO text.

Counts of fusions, reductions and conditionals show what XLA fused; ``entry_bytes``
estimates the bytes the program's own kernels read and write (operands + results of
each top-level instruction), leaving out the branches of conditionals, which run
only when taken (XLA's ``cost_analysis`` counts the costliest branch as if it ran).
"""

from __future__ import annotations

import math
import re
from typing import Any

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%(\S+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[subfc]\d+)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_BRANCHES = re.compile(
    r"(?:branch_computations=\{([^}]*)\}|(?:true|false)_computation=%([\w.\-]+))"
)
_COUNTED = ("fusion", "reduce", "reduce-window", "concatenate", "conditional", "while", "copy")
# Instructions that move no data of their own.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "opt-barrier"}
_FREE |= {"conditional", "while", "call", "after-all", "partition-id", "replica-id"}


def _bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = 1 if dtype == "pred" else int(dtype[1:])
        total += math.prod(int(d) for d in dims.split(",") if d) * max(bits // 8, 1)
    return total


def _computations(text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str]:
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = "", None
    for line in text.splitlines():
        start = _COMPUTATION.match(line)
        if start:
            current = start.group(2)
            comps[current] = []
            entry = current if start.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            instr = _INSTRUCTION.match(line)
            if instr:
                comps[current].append(instr.groups())
    return comps, entry


def _moved(instructions: list[tuple[str, str, str, str]]) -> int:
    sizes = {name: _bytes(shape) for name, shape, _, _ in instructions}
    total = 0
    for name, _, opcode, rest in instructions:
        if opcode in _FREE:
            continue
        operands = rest.split("), ", 1)[0]
        total += sizes[name] + sum(sizes.get(o, 0) for o in _OPERAND.findall(operands))
    return total


def hlo_facts(compiled: Any) -> dict[str, float]:
    """Instruction counts, bytes moved by the entry's kernels, and XLA's cost estimate."""
    text = compiled.as_text() or ""
    comps, entry = _computations(text)
    opcodes = [op for instrs in comps.values() for _, _, op, _ in instrs]
    facts: dict[str, float] = {"instructions": len(opcodes)}
    for op in _COUNTED:
        facts[op] = sum(1 for o in opcodes if o == op)
    if entry:
        facts["entry_bytes"] = _moved(comps[entry])
        branches = set()
        for _, _, op, rest in comps[entry]:
            for listed, single in _BRANCHES.findall(rest) if op == "conditional" else []:
                branches.update(_OPERAND.findall(listed) or [single])
        facts["branch_bytes"] = sum(_moved(comps.get(b, [])) for b in branches)
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        cost = None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if cost:
        facts["bytes_accessed"] = float(cost.get("bytes accessed", math.nan))
        facts["flops"] = float(cost.get("flops", math.nan))
    return facts
