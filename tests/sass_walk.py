"""A small SASS control-flow walker: count the instructions that execute, not the loop that looks like the main one.

One kernel's SASS (``nvdisasm -c``, split per function as ``tests/test_cuda_compile_tier._functions`` does) is
parsed into instructions, labels (``.L_x_N``) and basic blocks (leaders: the first instruction, every label,
every instruction after a branch or EXIT); loops are the back edges (a ``BRA`` to a label at or before it), a
loop spanning its header label to its last back edge (nvcc lays loops out contiguously), nested by containment.

``walk`` then executes one warp's path: every instruction on it is counted once per pass (predicated-off
instructions still issue, so they count too); an unconditional ``BRA`` jumps, an unconditional ``EXIT`` ends
the walk, and every conditional branch or EXIT asks a ``Plan`` which way it goes:

- ``Plan.override(branch)`` first: run-time flags and roles that the instructions themselves cannot tell
  (split-K or not, gather or not, the CTA that reduces, thread 0's atomic). ``True`` taken, ``False`` not
  taken, ``None``: not this rule's branch.
- otherwise a *work budget*: the caller says how much of some unit of work (an opcode such as ``HMMA``) the
  warp does per entry of a scope loop (or per kernel: scope ``None``), and each branch is decided greedily
  from the work still to do in the innermost scope around it, measured in the smallest *piece* of that unit
  the branch would run or skip (a basic block's unpredicated count of the unit, a loop being pieces too).
  A forward branch (or conditional EXIT) is taken, i.e. skips its region, iff the work left is smaller than
  the smallest piece in the region; a back edge is taken, i.e. runs the body again, iff the work left is at
  least the smallest piece in the body. This is how nvcc lays out counted loops: unrolled bodies first
  while a whole one fits, then remainder trips and single steps (``#pragma unroll(2)`` over trips of
  four loads: a two-trip loop, a one-trip block, four one-load steps; a runtime loop unrolled by 4: x16, x8,
  x4 pieces and a tail). So a loop whose trip count is zero at the given shape is skipped by construction.
- a branch that neither decides raises ``Undecided``: every direction on the path is accounted for.

The result, ``Trace.hits[i]``, is how many times instruction ``i`` executed; sum it over any range (the
prologue, a loop, the epilogue) or count opcodes on the executed path (``Trace.ops``), e.g. LDL / STL.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;")
_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_PRED = re.compile(r"@(!?)(U?P[T0-9]+)\s+")
_TARGET = re.compile(r"(\.L_x_\d+)")


class Undecided(Exception):
    """A conditional branch that no rule of the plan decides."""


@dataclass
class Instr:
    index: int
    text: str  # without the address and the trailing ';'
    opcode: str  # with its modifiers: HMMA.16816.F32, LDG.E.STRONG.GPU
    pred: str | None  # '@!P0' or None (an '@PT' guard is no guard)
    target: str | None  # label of a BRA

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def is_(self, unit: str) -> bool:
        """Whether this is ``unit``: the full opcode or a prefix of it ending at a '.' (``HMMA``, ``STS.128``)."""
        return self.opcode == unit or self.opcode.startswith(unit + ".")


@dataclass
class Loop:
    start: int  # index of the header's first instruction (the back edges' target)
    end: int  # index of the last back edge
    index: int = 0  # order of the headers in the function
    parent: Loop | None = None
    children: list[Loop] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)  # base opcodes of its whole span (nested loops included)

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    def contains(self, a: int, b: int) -> bool:
        """Whether instructions [a, b) lie in this loop."""
        return self.start <= a and b - 1 <= self.end

    def __repr__(self) -> str:
        return f"Loop#{self.index}[{self.start}:{self.end}] depth {self.depth} HMMA {self.ops['HMMA']}"


@dataclass
class Branch:
    """A conditional branch or EXIT, as a plan sees it."""

    instr: Instr
    kind: str  # 'back', 'forward' or 'exit'
    region: tuple[int, int]  # what taking it skips (forward / exit) or re-runs (back): [a, b)
    loop: Loop | None  # the loop whose back edge it is (back), else the innermost loop around it
    exit_ordinal: int | None  # among the function's conditional EXITs
    before: Counter  # base opcodes statically before it in the function
    skipped: Counter  # full opcodes of the region
    sides: tuple[Counter, Counter] | None  # forward branch over an if / else: (fall-through side, target side)


class Function:
    """One kernel's SASS, parsed."""

    def __init__(self, lines: Sequence[str]):
        self.instrs: list[Instr] = []
        self.labels: dict[str, int] = {}
        for line in lines:
            m = _LABEL.match(line)
            if m:
                self.labels[m.group(1)] = len(self.instrs)
                continue
            m = _INSTR.match(line)
            if not m:
                continue
            body = m.group(2)
            pred = None
            pm = _PRED.match(body)
            if pm:
                body = body[pm.end():]
                if pm.group(2) != "PT" or pm.group(1):  # '@PT' always runs
                    pred = f"@{pm.group(1)}{pm.group(2)}"
            opcode = body.split()[0] if body else ""
            tm = _TARGET.search(body) if opcode.split(".")[0] in ("BRA", "BRX", "JMP", "CALL") else None
            if opcode.split(".")[0] in ("BRX", "JMX", "CALL", "RET"):
                raise NotImplementedError(f"indirect or call control flow: {body}")
            self.instrs.append(Instr(len(self.instrs), body, opcode, pred, tm.group(1) if tm else None))
        n = len(self.instrs)
        leaders = {0} | set(self.labels.values())
        for ins in self.instrs:
            if ins.base in ("BRA", "EXIT"):
                leaders.add(ins.index + 1)
        self.leaders = sorted(i for i in leaders if i < n)
        self.block_end = {}  # leader -> one past its block's last instruction
        for a, b in zip(self.leaders, self.leaders[1:] + [n], strict=True):
            self.block_end[a] = b
        self.loops = self._find_loops()

    def target(self, ins: Instr) -> int:
        return self.labels[ins.target]

    def _find_loops(self) -> list[Loop]:
        ends: dict[int, int] = {}
        for ins in self.instrs:
            if ins.base == "BRA" and ins.target is not None and self.target(ins) <= ins.index:
                start = self.target(ins)
                ends[start] = max(ends.get(start, start), ins.index)
        loops = [Loop(s, e) for s, e in sorted(ends.items())]
        for i, lp in enumerate(loops):
            lp.index = i
            lp.ops = Counter(ins.base for ins in self.instrs[lp.start: lp.end + 1])
            around = [o for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end]
            if around:
                lp.parent = max(around, key=lambda o: o.start)  # the innermost: latest header
                lp.parent.children.append(lp)
        return loops

    def innermost(self, a: int, b: int | None = None) -> Loop | None:
        """The innermost loop around instructions [a, b) (default: instruction a)."""
        b = a + 1 if b is None else b
        around = [lp for lp in self.loops if lp.contains(a, b)]
        return max(around, key=lambda lp: lp.start) if around else None

    def ops(self, a: int, b: int, full: bool = False) -> Counter:
        return Counter(ins.opcode if full else ins.base for ins in self.instrs[a:b])

    def pieces(self, a: int, b: int, unit: str) -> list[int]:
        """Unpredicated ``unit`` count of each basic block (cut to [a, b)) that has any: the pieces of work that
        running the region can do at a time."""
        out = []
        for lead in self.leaders:
            lo, hi = max(lead, a), min(self.block_end[lead], b)
            if lo < hi:
                k = sum(1 for ins in self.instrs[lo:hi] if ins.pred is None and ins.is_(unit))
                if k:
                    out.append(k)
        return out


@dataclass
class Budget:
    """``amount`` of ``unit`` per entry of the scope loop (each pass through its header), or per walk if
    ``scope`` is None. ``scope`` picks the loop from the function's loops."""

    unit: str
    amount: int
    scope: Callable[[Function], Loop] | None = None


@dataclass
class Plan:
    budgets: list[Budget]  # in order of precedence: a region's first unit present decides it
    override: Callable[[Branch], bool | None] = lambda b: None


@dataclass
class Trace:
    fn: Function
    hits: list[int]

    def count(self, a: int = 0, b: int | None = None, where: Callable[[Instr], bool] | None = None) -> int:
        b = len(self.hits) if b is None else b
        return sum(h for ins, h in zip(self.fn.instrs[a:b], self.hits[a:b], strict=True) if where is None or where(ins))

    @property
    def ops(self) -> Counter:
        c = Counter()
        for ins, h in zip(self.fn.instrs, self.hits, strict=True):
            if h:
                c[ins.base] += h
        return c

    def in_loop(self, lp: Loop) -> int:
        return self.count(lp.start, lp.end + 1)


def _branch(fn: Function, ins: Instr, exit_ordinals: dict[int, int]) -> Branch:
    i, n = ins.index, len(fn.instrs)
    sides = None
    if ins.base == "EXIT":
        kind, region, loop = "exit", (i + 1, n), fn.innermost(i)
    else:
        t = fn.target(ins)
        if t <= i:
            kind, region = "back", (t, i + 1)
            loop = next(lp for lp in fn.loops if lp.start == t)
        else:
            kind, region, loop = "forward", (i + 1, t), fn.innermost(i)
            last = fn.instrs[t - 1]
            if last.base == "BRA" and last.pred is None and last.target and fn.target(last) > t:
                sides = (fn.ops(i + 1, t, full=True), fn.ops(t, fn.target(last), full=True))
    return Branch(ins, kind, region, loop, exit_ordinals.get(i), fn.ops(0, i), fn.ops(*region, full=True), sides)


def walk(fn: Function, plan: Plan, max_steps: int = 10_000_000) -> Trace:
    """One warp's pass through ``fn`` under ``plan``; see the module's docstring."""
    hits = [0] * len(fn.instrs)
    exit_ordinals = {ins.index: k for k, ins in enumerate(
        i for i in fn.instrs if i.base == "EXIT" and i.pred is not None)}
    scopes = [(b, b.scope(fn) if b.scope else None) for b in plan.budgets]
    left = [b.amount for b, _ in scopes]
    headers = {lp.start: lp for _, lp in scopes if lp is not None}
    pc, steps = 0, 0
    branches: dict[int, Branch] = {}
    while pc < len(fn.instrs):
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"walk did not end after {max_steps} instructions (at {pc}: {fn.instrs[pc].text})")
        ins = fn.instrs[pc]
        if pc in headers:  # a pass through a scope loop's header: its budgets start again
            for k, (b, lp) in enumerate(scopes):
                if lp is headers[pc]:
                    left[k] = b.amount
        hits[pc] += 1
        if ins.pred is None:
            for k, (b, lp) in enumerate(scopes):
                if ins.is_(b.unit) and (lp is None or lp.contains(pc, pc + 1)):
                    left[k] -= 1
        if ins.base not in ("BRA", "EXIT"):
            pc += 1
            continue
        if ins.pred is None:
            if ins.base == "EXIT":
                break
            pc = fn.target(ins)
            continue
        br = branches.get(pc)
        if br is None:  # static per instruction: built once per walk (a loop's back edge is asked every pass)
            br = branches[pc] = _branch(fn, ins, exit_ordinals)
        taken = _decide(fn, br, plan, scopes, left)
        if ins.base == "EXIT":
            if taken:
                break
            pc += 1
        else:
            pc = fn.target(ins) if taken else pc + 1
    return Trace(fn, hits)


def _decide(fn: Function, br: Branch, plan: Plan, scopes, left) -> bool:
    taken = plan.override(br)
    if taken is not None:
        return bool(taken)
    if br.sides is not None:
        raise Undecided(f"if / else at {br.instr.index} ({br.instr.text}): the plan must choose a side")
    a, b = br.region
    for budget in plan.budgets:
        pieces = fn.pieces(a, b, budget.unit)
        if not pieces:
            continue
        # the innermost scope of this unit around the region (a back edge's own loop restarts per pass: not it)
        best = None
        for k, (bud, lp) in enumerate(scopes):
            if bud.unit != budget.unit:
                continue
            if lp is not None and (not lp.contains(a, b) or (br.kind == "back" and lp is br.loop)):
                continue
            if best is None or (lp is not None and (scopes[best][1] is None or lp.start > scopes[best][1].start)):
                best = k  # a loop scope beats the walk's, a later header (nested deeper) beats an earlier one
        if best is None:
            continue
        need = min(pieces)
        return left[best] >= need if br.kind == "back" else left[best] < need
    raise Undecided(f"{br.kind} branch at {br.instr.index} ({br.instr.text}): no budget unit in its region "
                    f"{dict(br.skipped.most_common(6))} and no override")
