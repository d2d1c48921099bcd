"""The section table's types: one `Section` entry per Darknet section (no torch import).

An entry says everything the rest of the toolkit needs to know about a section: its keys (types,
defaults, bounds; checked with `file:line` errors), which keys hold layer references, its inputs, its
output channels and shape, how to build its torch module, how channels flow through it (for coupling
and surgery), how its weights are sliced when pruning, its weights and FLOPs, and its pruning/quantization
rules. Adding a section = one entry; code outside `sections/` asks the entry, never the section's name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, TypeVar

from compress.base.errors import CfgError
from compress.darknet.block import Block
from compress.darknet.geometry import strides

__all__ = ["Key", "Ctx", "Section", "FlowOps", "Shape", "SECTIONS", "register", "lookup", "check_keys",
           "DIALECTS", "resolve_refs", "block_inputs", "canonical", "strides", "quant_keep", "quant_join"]

Shape = tuple[int, int, int]
V = TypeVar("V")
DIALECTS = ("darknet", "reference")


@dataclass(frozen=True)
class Key:
    """One cfg key: kind int|float|ints|floats|str, default (None = optional), inclusive bounds, choices."""

    name: str
    kind: str = "int"
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ctx:
    """What a section may know about the network around it while it is resolved or built."""

    index: int
    dialect: str = "darknet"
    net_channels: int = 3
    head_index: int = 0    # number of detection heads before this block


class FlowOps(Protocol[V]):
    """Channel-vector operations: coupling uses channel ids, surgery keep-masks and constants."""

    def own(self, i: int) -> V: ...
    def cat(self, vs: Sequence[V]) -> V: ...
    def part(self, v: V, groups: int, group_id: int) -> V: ...
    def add(self, a: V, b: V) -> V: ...                  # residual join; output has a's length
    def tie(self, a: V, b: V) -> None: ...               # channel j of a is channel j of b (depthwise)
    def keep_whole(self, v: V) -> None: ...              # these channels must not be cut
    def opaque(self, v: V, block: Block) -> None: ...    # kept whole AND mixed non-linearly (gates, products,
                                                         #   weights): a removed layer's constant cannot pass
    def act(self, v: V, block: Block) -> V: ...          # the block's own activation= applied to v (a join's)
    def fresh(self, i: int) -> V: ...                    # block i's channels, new and never cut


def _same_channels(block: Block, ins: list[int], ctx: Ctx) -> int:
    return ins[0]


def _same_shape(block: Block, ins: list[Shape], c: int, ctx: Ctx) -> Shape:
    return c, ins[0][1], ins[0][2]


def _flow_pass(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    return ins[0]


def _flow_fixed(block: Block, i: int, ins: list, ops: FlowOps) -> Any:
    for v in ins:
        ops.opaque(v, block)
    return ops.fresh(i)


def _zero(*_: Any) -> int:
    return 0


# Output quantization rules (`Section.quant`): what a non-conv block's output is quantized on, given its number of
# inputs. "keep": its input's grid (the producer's params; exact for pooling, upsampling, a one-input route),
# "new": an own observer (joins of differently scaled tensors), None: left float.
def _quant_none(n_inputs: int) -> str | None:
    return None


def quant_keep(n_inputs: int) -> str | None:
    return "keep"


def quant_join(n_inputs: int) -> str | None:
    return "keep" if n_inputs == 1 else "new"


@dataclass(frozen=True)
class Section:
    """A Darknet section. Callables (all but `build` have defaults):

    * channels(block, in_channels, ctx) -> output channels (raises CfgError on a bad combination);
    * shape(block, in_shapes, channels, ctx) -> (C, H, W) (raises CfgError on an impossible size);
    * build(block, in_channels, ctx) -> torch module (its `darknet_tensors()`, if any, are its weights);
    * flow(block, i, in_vectors, ops) -> output vector (channel flow for coupling and surgery);
    * macs(block, module, in_shapes, out_shape) -> multiply-adds of one image;
    * params(block, in_channels, out_channels, ctx) -> floats in `.weights` (estimated before allocating);
    * resize(block, kept_out) -> the block rewritten for `kept_out` output channels after pruning;
    * copy_pruned(dst, src, out_idx, in_keep, offset) -> None: copy the module `src` into its resized `dst`
      (output rows `out_idx`, the input channels kept by the bool vector `in_keep`, the removed channels'
      constant `offset` folded in); None copies the whole state dict;
    * bind(block, i, graph, layers) -> None: link modules once all exist (a conv sharing another's weights);
    * check(block) -> None: parse-time checks beyond `keys` (raise CfgError naming `file:line`);
    * quant(n_inputs) -> "keep" | "new" | None: how a non-conv block's output is quantized;
    * residual(block) -> bool, only on sections whose output is the previous layer plus its from= layers:
      whether this block is a plain add (unweighted, linear activation), so a residual unit it closes can be
      removed exactly;
    * guards_producer(blocks, i) -> bool: the reference keeps block i-1 out of the prune set because block i
      follows it (its rules 3 and 4: the conv before [upsample], the conv feeding SPP).
    """

    name: str
    summary: str
    build: Callable
    keys: tuple[Key, ...] = ()
    refs: tuple[str, ...] = ()        # keys whose values are layer indices (remapped on layer removal)
    reads_previous: bool = True       # the previous layer is the first input
    inputs: Callable | None = None    # (block, i) -> absolute input indices, when refs/reads_previous do not say
    channels: Callable = _same_channels
    shape: Callable = _same_shape
    flow: Callable = _flow_pass
    macs: Callable = _zero
    params: Callable = _zero
    resize: Callable | None = None
    copy_pruned: Callable | None = None   # (dst, src, out_idx, in_keep, offset): slices weights for pruning
    bind: Callable | None = None      # (block, i, graph, layers) after all modules exist (share_index)
    check: Callable | None = None     # (block) parse-time checks beyond `keys`
    quant: Callable[[int], str | None] = _quant_none   # (n_inputs) output quantization, see quant_keep/join
    residual: Callable | None = None  # (block) -> plain add? Set on sections adding from= layers to the previous
    guards_producer: Callable | None = None   # (blocks, i) -> the reference does not prune block i-1
    head: bool = False                # a detection head (YOLOLayer-like)
    darknet_loss: bool = False        # a head carrying Darknet's training keys: the darknet loss trains it
    conv: bool = False                # a ConvBNAct: its output channels can be masked by pruning
    unit_passenger: bool = False      # one input, same channels and size: may sit inside a removable residual unit
    inference_identity: bool = False  # passes its input unchanged at inference (constants too): [dropout]
    dialects: tuple[str, ...] = ("darknet",)   # where it comes from: darknet, reference, yolo-compress
    aliases: tuple[str, ...] = ()
    header: str = ""                  # spelling written back when it is not the name ([Gaussian_yolo])
    pruning: str = "passes channels through"   # the channel rule in words (README)
    weights: str = ""                 # what it stores in .weights (README)


SECTIONS: dict[str, Section] = {}
_ALIASES: dict[str, str] = {}


def register(section: Section) -> Section:
    SECTIONS[section.name] = section
    for alias in section.aliases:
        _ALIASES[alias] = section.name
    return section


def canonical(name: str) -> str:
    return _ALIASES.get(name, name)


def lookup(block: Block) -> Section:
    try:
        return SECTIONS[canonical(block.type)]
    except KeyError:
        raise CfgError(f"{block.where()}: unsupported section [{block.type}]") from None


def _check_value(block: Block, key: Key) -> None:
    if key.kind == "str":
        raw = (block.get(key.name) or "").lower()
        if key.choices and raw not in key.choices:
            raise CfgError(f"{block.where(key.name)}: [{block.type}] {key.name}={raw} is not supported; use one of "
                           + ", ".join(key.choices))
        return
    getter = {"int": block.get_int, "float": block.get_float, "ints": block.get_ints,
              "floats": block.get_floats}[key.kind]
    value = getter(key.name)
    for v in value if isinstance(value, tuple) else (value,):
        if not math.isfinite(v):  # nan passes every comparison: scale_x_y=nan would make every box NaN
            raise CfgError(f"{block.where(key.name)}: [{block.type}] {key.name}={block.get(key.name)} is not a finite "
                           "number; fix the value in the cfg")
        if key.min is not None and v < key.min:
            raise CfgError(f"{block.where(key.name)}: [{block.type}] {key.name}={block.get(key.name)} must be "
                           f">= {key.min:g}; fix the value in the cfg")
        if key.max is not None and v > key.max:
            raise CfgError(f"{block.where(key.name)}: [{block.type}] {key.name}={block.get(key.name)} must be "
                           f"<= {key.max:g}; fix the value in the cfg")


def check_keys(block: Block, section: Section) -> None:
    """Type- and bound-check every declared key present in the block (unknown keys are kept, as Darknet does)."""
    for key in section.keys:
        if block.has(key.name):
            _check_value(block, key)


def resolve_refs(block: Block, i: int, key: str) -> tuple[int, ...]:
    """Absolute indices of the layers named by `key` (Darknet: negative = relative to this layer)."""
    refs = block.get_ints(key)
    if not refs:
        raise CfgError(f"{block.where(key)}: [{block.type}] needs at least one index in {key}=")
    out = []
    for r in refs:
        j = i + r if r < 0 else r
        if j < 0 or j >= i:
            raise CfgError(f"{block.where()}: [{block.type}] {key}={r} points to layer {j}, but layer {i} can only "
                           f"read layers 0..{i - 1}; fix the index")
        out.append(j)
    return tuple(out)


def block_inputs(block: Block, section: Section, i: int) -> tuple[int, ...]:
    """Absolute producer indices of block i (-1 = the image): previous layer first, then its references."""
    if section.inputs is not None:
        return section.inputs(block, i)
    prev = (i - 1,) if section.reads_previous else ()
    return prev + tuple(j for key in section.refs for j in resolve_refs(block, i, key))
