"""Facts about an optimised XLA program, read from its HLO text (`compiled.as_text()`), for `compile`.

What decides an accelerator program's speed and memory, checkable without the accelerator:

  convs            convolutions by kind and input dtype: cuDNN custom calls on GPU (`__cudnn$convForward`,
                   `...BiasActivationForward`: "forward"; `...BackwardInput`: "backward_input";
                   `...BackwardFilter`: "backward_filter"), XLA `convolution` ops elsewhere (TPU fuses them; kind
                   "convolution"). The dtype is that of the conv's first operand (the activation or gradient).
  dilated_convs    convs whose window has `lhs_dilate` or `rhs_dilate` != 1 (a transposed conv's lhs-dilated
                   form, or the whole-activation "filter" of its weight gradient): slow paths of cuDNN and XLA.
  conv_windows     the convs' window sizes (e.g. "3x3": count).
  large_window_convs  convs with a window side > LARGE_WINDOW (the networks' kernels are at most 3x3): a weight
                   gradient that XLA could not map to cuDNN's backward-filter conv runs as a forward conv whose
                   window is the whole activation (e.g. 80x80), usually fed by NHWC->CHWN transposes.
  transposes       physical transposes of >= 1 MiB: `transpose` instructions (standalone, or the heroes of
                   transpose fusions and other fused transposes, i.e. in any computation) and layout-changing
                   `copy` instructions (the same permutation after layout assignment). Each counted once per
                   appearance in the program text: one in a loop body is counted once, not once per trip.
                   With `weight_sizes` (the element counts of the model's parameters) they are split into
                   transposes of weights (arrays with as many elements as one parameter: weights, their casts and
                   gradients in another layout) and of activations (everything else: what scales with the batch).
                   `*_minor_*` counts only those whose physical minor dimension changes (e.g. NHWC -> CHWN): the
                   true transposes, which need tiled transpose kernels. The others keep the minor dimension and
                   permute contiguous rows of it (a depth-to-space with the channels minor): XLA emits them as
                   plain loop fusions whose reads stay coalesced.
                   The weights' (GPU, 253 MiB per bf16 train step at any batch) are layout changes: XLA's GPU
                   layout pass gives the NHWC convs OHWI filters, jax passes the train state row-major (HWIO), so
                   the forward casts, the optimizer's update fusions (in the OHWI gradient's order) and the
                   frozen RRDB's stacked kernels go through transposes. No conv dimension_numbers change that;
                   the state's own layout does (`compile --state_layouts auto`: 8 MiB left; README).
  loops            every `while` with XLA's `known_trip_count` (None when XLA could not tell) and, for its
                   body (with everything it calls), its number of convs, the `convert`s of loop-invariant values (parameters the loop
                   passes through unchanged, e.g. weights: a cast that belongs before the loop) and the
                   converts of >= 1 MiB arrays.
  written_mib      the bytes of every buffer the program writes, counted once per appearance (a loop body's once):
                   the results of its top-level instructions (not inside fusions; conv scratch left out), except
                   those that write nothing (parameters, tuples, bitcasts, constants, loops and calls, whose
                   bodies are counted). Two forms of the same program that move the same data write the same.
  host_transfers   send/recv with is_host_transfer, infeed/outfeed, custom calls to host callbacks or host
                   offloading, and buffers in host memory (memory space S(5)).

The parser knows only what it needs of HLO's text syntax: computations, instructions with their result
shape, opcode, operands and attributes.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re

MIB = 2**20
BYTES_PER_ELEMENT = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                     "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
                     "c128": 16, "token": 0}
CUDNN_CONV_KINDS = {"__cudnn$convForward": "forward", "__cudnn$convBiasActivationForward": "forward",
                    "__cudnn$convForwardGraph": "forward", "__cudnn$convBackwardInput": "backward_input",
                    "__cudnn$convBackwardFilter": "backward_filter"}
# Ops a loop-invariant value may pass through (unchanged in value or only re-laid-out) before its convert.
_PASS_THROUGH = {"bitcast", "copy", "reshape", "transpose", "get-tuple-element"}
LARGE_WINDOW = 7
_HOST_CALL = re.compile(r"callback|host", re.IGNORECASE)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\](?:\{([^}]*)\})?")
_HEADER = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str        # the result shape text, e.g. "bf16[8,64,64,32]{3,2,1,0}" or a tuple "(f32[2], u8[0])"
  opcode: str
  operands: list[str]
  attrs: str        # everything after the operand list
  root: bool = False
  args: str = ""    # the operand list's text (a parameter's number)

  @property
  def arrays(self) -> list[tuple[str, tuple[int, ...], str | None]]:
    """(element type, dims, layout) of each array in the result shape."""
    return [(t, tuple(int(d) for d in dims.split(",") if d), layout)
            for t, dims, layout in _ARRAY.findall(self.shape) if t in BYTES_PER_ELEMENT]

  @property
  def bytes(self) -> int:
    total = 0
    for t, dims, _ in self.arrays:
      n = 1
      for d in dims:
        n *= d
      total += n * BYTES_PER_ELEMENT[t]
    return int(total)

  @property
  def dtype(self) -> str | None:
    arrays = self.arrays
    return arrays[0][0] if arrays else None

  def attr(self, key: str) -> str | None:
    m = re.search(rf"\b{re.escape(key)}=(%?[^\s,]+)", self.attrs)
    return m.group(1).lstrip("%") if m else None


def _split_balanced(text: str, start: int) -> int:
  """The index just past the parenthesis group opening at text[start] ('(')."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "({[":
      depth += 1
    elif text[i] in ")}]":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def parse_instruction(line: str) -> Instruction | None:
  line = line.strip()
  root = line.startswith("ROOT ")
  if root:
    line = line[5:]
  if not line.startswith("%") or " = " not in line:
    return None
  name, rest = line[1:].split(" = ", 1)
  if rest.startswith("("):
    end = _split_balanced(rest, 0)
    shape, rest = rest[:end], rest[end:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  m = re.match(r"([\w\-]+)\(", rest)
  if not m:
    return None
  opcode = m.group(1)
  end = _split_balanced(rest, m.end() - 1)
  operands = re.findall(r"%([^\s,()]+)", rest[m.end():end - 1])
  return Instruction(name.strip(), shape, opcode, operands, rest[end:], root, rest[m.end():end - 1])


def parse_module(text: str) -> tuple[dict[str, dict[str, Instruction]], str | None]:
  """({computation name: {instruction name: Instruction}} in text order, the entry computation's name)."""
  comps: dict[str, dict[str, Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      comps[current] = {}
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    inst = parse_instruction(line)
    if inst is not None:
      comps[current][inst.name] = inst
  return comps, entry


def _called(inst: Instruction) -> list[str]:
  """The computations an instruction calls (fusions, loops, conditionals, reductions, ...)."""
  names = re.findall(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([^\s,}]+)", inst.attrs)
  m = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
  if m:
    names += re.findall(r"%([^\s,]+)", m.group(1))
  return names


def _reachable(comps, start: str) -> list[str]:
  seen, todo = [], [start]
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.append(c)
    for inst in comps[c].values():
      todo.extend(_called(inst))
  return seen


def _trip_count(inst: Instruction) -> int | None:
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', inst.attrs)
  return int(m.group(1)) if m else None


def _window_dilated(inst: Instruction) -> bool:
  m = re.search(r"window=\{([^}]*)\}", inst.attrs)
  if not m:
    return False
  for key in ("lhs_dilate", "rhs_dilate"):
    d = re.search(rf"{key}=([0-9x]+)", m.group(1))
    if d and any(int(v) != 1 for v in d.group(1).split("x")):
      return True
  return False


def _window_sides(inst: Instruction) -> list[int]:
  m = re.search(r"window=\{size=([0-9x]+)", inst.attrs)
  return [int(v) for v in m.group(1).split("x")] if m else []


def _minor_dim(layout: str | None, rank: int) -> int:
  """The physical minor-most dimension of an array with this layout text ("3,2,1,0:T(8,128)"; None: default)."""
  if not layout:
    return rank - 1
  return int(layout.split(":")[0].split(",")[0])


def _changes_minor_dim(inst: Instruction, comp: dict[str, Instruction]) -> bool:
  """Whether a transpose (or layout-changing copy) moves a different dimension into the minor position."""
  src = comp.get(inst.operands[0]) if inst.operands else None
  if src is None or not src.arrays or not inst.arrays:
    return True
  (_, sdims, slayout), (_, ddims, dlayout) = src.arrays[0], inst.arrays[0]
  out_minor = _minor_dim(dlayout, len(ddims))
  if inst.opcode == "copy":
    return _minor_dim(slayout, len(sdims)) != out_minor
  m = re.search(r"dimensions=\{([0-9,]*)\}", inst.attrs)
  if not m:
    return True
  perm = [int(v) for v in m.group(1).split(",") if v]
  return perm[out_minor] != _minor_dim(slayout, len(sdims))


def _conv_kind(inst: Instruction) -> str | None:
  if inst.opcode == "convolution":
    return "convolution"
  if inst.opcode == "custom-call":
    target = (re.search(r'custom_call_target="([^"]+)"', inst.attrs) or [None, ""])[1]
    return CUDNN_CONV_KINDS.get(target)
  return None


def _is_physical_copy(inst: Instruction, comp: dict[str, Instruction]) -> bool:
  """A `copy` whose result layout differs from its operand's: a transpose in memory."""
  if inst.opcode != "copy" or not inst.operands or inst.operands[0] not in comp:
    return False
  src, dst = comp[inst.operands[0]].arrays, inst.arrays
  return bool(src and dst) and src[0][1] == dst[0][1] and src[0][2] != dst[0][2] and len(src[0][1]) > 1


class _LoopInvariants:
  """Which values of a while body are loop-invariant: the body parameter's tuple elements that the ROOT tuple
  passes through unchanged, and whatever reaches a convert from them only through pass-through ops."""

  def __init__(self, comps, body: str):
    self.comps, self.body = comps, body
    comp = comps[body]
    params = {n for n, i in comp.items() if i.opcode == "parameter"}
    root = next((i for i in comp.values() if i.root), None)
    self.invariant = set()
    if root is not None and root.opcode == "tuple":
      for k, op in enumerate(root.operands):
        src = comp.get(op)
        if src is not None and src.opcode == "get-tuple-element" and src.operands and src.operands[0] in params \
           and src.attr("index") == str(k):
          self.invariant.add(k)
    self.params = params
    self._callers = {}  # fused/called computation -> (caller's computation, the calling instruction)

  def _from_invariant(self, comp_name: str, value: str, depth: int = 0) -> bool:
    comp = self.comps[comp_name]
    inst = comp.get(value)
    if inst is None or depth > 32:
      return False
    if comp_name == self.body:
      if inst.opcode == "get-tuple-element" and inst.operands and inst.operands[0] in self.params:
        return int(inst.attr("index") or -1) in self.invariant
    elif inst.opcode == "parameter":
      caller = self._callers.get(comp_name)
      if caller is None:
        return False
      outer, call = caller
      k = int(inst.args) if inst.args.strip().isdigit() else -1
      return 0 <= k < len(call.operands) and self._from_invariant(outer, call.operands[k], depth + 1)
    if inst.opcode in _PASS_THROUGH and inst.operands:
      return self._from_invariant(comp_name, inst.operands[0], depth + 1)
    return False

  def converts(self) -> list[tuple[Instruction, bool]]:
    """(convert, of a loop-invariant value?) for every convert in the body and the computations it calls
    (fusions and reductions; a nested loop's body is counted for that loop too)."""
    names = _reachable(self.comps, self.body)
    for c in names:
      for inst in self.comps[c].values():
        if inst.opcode in ("fusion", "call"):
          for callee in _called(inst):
            self._callers.setdefault(callee, (c, inst))
    out = []
    for c in names:
      for inst in self.comps[c].values():
        if inst.opcode == "convert" and inst.operands:
          out.append((inst, self._from_invariant(c, inst.operands[0])))
    return out


def _elements(inst: Instruction) -> int:
  n = 1
  for d in (inst.arrays[0][1] if inst.arrays else ()):
    n *= d
  return n


_WRITES_NOTHING = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
                   "after-all", "opt-barrier"}


def written_bytes(comps) -> int:
  """The `written_mib` fact in bytes (see the module docstring)."""
  fused = {callee for comp in comps.values() for inst in comp.values() if inst.opcode == "fusion"
           for callee in _called(inst)}
  total = 0
  for cname, comp in comps.items():
    if cname in fused:
      continue
    for inst in comp.values():
      if inst.opcode in _WRITES_NOTHING:
        continue
      if _conv_kind(inst) is not None and inst.shape.startswith("("):
        t, dims, _ = inst.arrays[0]  # a cuDNN conv's (result, scratch): the result
        n = 1
        for d in dims:
          n *= d
        total += int(n * BYTES_PER_ELEMENT[t])
      else:
        total += inst.bytes
  return total


def facts(text: str, min_bytes: int = MIB, weight_sizes=frozenset()) -> dict:
  """The facts listed in the module docstring, as a JSON-able dict."""
  comps, entry = parse_module(text)
  convs = collections.Counter()
  dilated, wide, transposes, host = [], [], [], collections.Counter()
  windows = collections.Counter()
  loops = []
  for cname, comp in comps.items():
    for inst in comp.values():
      kind = _conv_kind(inst)
      if kind is not None:
        src = comp.get(inst.operands[0]) if inst.operands else None
        dtype = src.dtype if src is not None else inst.dtype
        convs[f"{kind}:{dtype}"] += 1
        if _window_dilated(inst):
          dilated.append({"kind": kind, "dtype": dtype, "window": re.search(r"window=\{([^}]*)\}", inst.attrs)[1]})
        windows["x".join(map(str, _window_sides(inst)))] += 1
        if any(side > LARGE_WINDOW for side in _window_sides(inst)):
          wide.append({"kind": kind, "dtype": dtype, "window": re.search(r"window=\{([^}]*)\}", inst.attrs)[1]})
      if (inst.opcode == "transpose" or _is_physical_copy(inst, comp)) and inst.bytes >= min_bytes:
        transposes.append((inst.bytes, _elements(inst) in weight_sizes, _changes_minor_dim(inst, comp)))
      if inst.opcode in ("send", "recv") and "is_host_transfer=true" in inst.attrs:
        host[inst.opcode] += 1
      elif inst.opcode in ("infeed", "outfeed"):
        host[inst.opcode] += 1
      elif inst.opcode == "custom-call":
        target = (re.search(r'custom_call_target="([^"]+)"', inst.attrs) or [None, ""])[1]
        if _HOST_CALL.search(target):
          host[f"custom-call:{target}"] += 1
      if "S(5)" in inst.shape:
        host["host_memory_buffer"] += 1
      if inst.opcode == "while":
        body = inst.attr("body")
        loop = {"trip_count": _trip_count(inst), "body": body}
        if body in comps:
          conv = _LoopInvariants(comps, body).converts()
          inv = [c for c, is_inv in conv if is_inv]
          large = [c for c, _ in conv if c.bytes >= min_bytes]
          body_convs = sum(_conv_kind(i) is not None for c in _reachable(comps, body) for i in comps[c].values())
          loop.update(convs=body_convs, converts=len(conv), converts_of_invariants=len(inv),
                      converts_of_invariants_mib=round(sum(c.bytes for c in inv) / MIB, 2),
                      converts_large=len(large), converts_large_mib=round(sum(c.bytes for c in large) / MIB, 2))
        loops.append(loop)
  return {
      "convs": dict(sorted(convs.items())),
      "convs_total": sum(convs.values()),
      "dilated_convs": len(dilated),
      "dilated_conv_windows": dilated[:20],
      "conv_windows": dict(sorted(windows.items())),
      "large_window_convs": len(wide),
      "large_window_conv_windows": wide[:20],
      "transposes_1mib": len(transposes),
      "transposes_mib": round(sum(b for b, _, _ in transposes) / MIB, 2),
      "transposes_activations_1mib": sum(not w for _, w, _ in transposes),
      "transposes_activations_mib": round(sum(b for b, w, _ in transposes if not w) / MIB, 2),
      "transposes_minor_mib": round(sum(b for b, _, m in transposes if m) / MIB, 2),
      "transposes_activations_minor_1mib": sum(m and not w for _, w, m in transposes),
      "transposes_activations_minor_mib": round(sum(b for b, w, m in transposes if m and not w) / MIB, 2),
      "written_mib": round(written_bytes(comps) / MIB, 1),
      "loops": loops,
      "host_transfers": dict(host),
  }


if __name__ == "__main__":  # facts of an HLO text file: python -m diffssr_jax.benchmarks.hlo module.txt
  import pathlib
  import sys
  print(json.dumps(facts(pathlib.Path(sys.argv[1]).read_text())))
