"""``fuse(model)``: replace Conv2d -> ReLU (and, in eval mode, Conv2d -> BatchNorm2d -> ReLU) by FusedConv2dReLU.

How it works: the model is traced with ``torch.fx``; each ``nn.Conv2d`` call whose output goes only to a ReLU (an
``nn.ReLU`` module with or without ``inplace``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` or their in-place
forms), or only to an eval-mode ``nn.BatchNorm2d`` whose output goes only to a ReLU, becomes one
:class:`~fastmtl.nn.conv.FusedConv2dReLU` call and the ReLU (and BatchNorm) calls are removed. The result is a
``torch.fx.GraphModule`` with the original module hierarchy, so ``state_dict`` keys are unchanged where no
BatchNorm was folded; a folded BatchNorm disappears (its keys with it) and its convolution gains a bias.

A model ``torch.fx`` cannot trace (data-dependent control flow, ...), or whose traced graph differs between train and
eval mode (a branch on ``self.training``, which fx would freeze), falls back to walking every ``nn.Sequential``
in it (unless it is in eval mode and the frozen eval graph is safe: see :func:`fuse`), fusing adjacent ``Conv2d, ReLU`` and (eval) ``Conv2d, BatchNorm2d, ReLU`` children in place; the ReLU and
BatchNorm slots become ``nn.Identity``, so the hierarchy (and the model's class) is kept.

Folding a BatchNorm is for inference only: the fused convolutions it produces refuse ``train()`` with an error.

The report (:class:`FuseReport`: what was fused, what was not and why) is logged on the ``fastmtl.nn.fuse``
logger at INFO level, attached to the returned model as ``fastmtl_fuse_report`` and returned by
:func:`fuse_report`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastmtl.nn.conv import FusedConv2dReLU, unsupported_reason

logger = logging.getLogger(__name__)

REPORT_ATTR = "fastmtl_fuse_report"

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, getattr(F, "relu_", torch.relu_))
_RELU_METHODS = ("relu", "relu_")


@dataclasses.dataclass
class FuseReport:
    """What :func:`fuse` did.

    Attributes:
        method: ``"fx"`` (traced) or ``"sequential"`` (fallback walk over nn.Sequential containers).
        fused: ``(conv name, "conv+relu" | "conv+bn+relu")`` for each fused convolution.
        skipped: ``(conv name, reason)`` for each convolution left alone.
        trace_error: why the torch.fx path was not taken: tracing failed, or the traced graph depends on train /
            eval mode (fallback only).
        frozen_mode: ``"eval"`` when the forward branches on ``self.training`` and the fx graph keeps its eval
            branch (only with BatchNorm folded, so that ``train()`` is refused); else None.
    """

    method: str
    fused: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    trace_error: str | None = None
    frozen_mode: str | None = None

    @property
    def num_fused(self) -> int:
        """Number of convolutions replaced by FusedConv2dReLU."""
        return len(self.fused)

    @property
    def num_folded(self) -> int:
        """Number of BatchNorm layers folded into a fused convolution."""
        return sum(kind == "conv+bn+relu" for _, kind in self.fused)

    def __str__(self) -> str:
        lines = [
            f"fastmtl.fuse ({self.method}): fused {self.num_fused} convolution(s) ({self.num_folded} with BatchNorm "
            f"folded), left {len(self.skipped)} alone"
        ]
        if self.trace_error:
            lines.append(f"  torch.fx path not taken: {self.trace_error}")
        if self.frozen_mode:
            lines.append(f"  the forward branches on self.training: the graph keeps its {self.frozen_mode} branch")
        lines += [f"  fused {name}: {kind}" for name, kind in self.fused]
        lines += [f"  left {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def fuse_report(model: nn.Module) -> FuseReport | None:
    """The :class:`FuseReport` of a model returned by :func:`fuse` (None if it has none).

    The report is a plain attribute: pickling keeps it, but ``copy.deepcopy`` of a ``GraphModule`` drops it.
    """
    return getattr(model, REPORT_ATTR, None)


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace Conv2d -> ReLU and (eval) Conv2d -> BatchNorm2d -> ReLU by :class:`FusedConv2dReLU`.

    Args:
        model: any ``nn.Module``.
        inplace: False (default) works on a deep copy, so ``model`` is untouched. True reuses ``model``'s modules
            and parameters (the fused convolutions share the original Parameters where no BatchNorm was folded,
            and the Sequential fallback edits ``model`` itself); use the returned module in either case.

    Returns:
        The fused model: a ``torch.fx.GraphModule`` with the same submodule names when tracing works (methods
        other than ``forward`` are not carried over), else the (copied) model with its Sequentials fused.
        Outputs and gradients equal the original's; with BatchNorm folded the model is for inference only and
        ``train()`` raises. ``fuse_report(result)`` (also ``result.fastmtl_fuse_report``) says what was fused.

    A forward that branches on ``self.training`` (GoogLeNet's and Inception-v3's auxiliary heads, functional dropout)
    is traced in eval mode when the model is in eval mode, a BatchNorm gets folded and no module whose ``train()``
    would still be allowed can change the graph: the result cannot leave eval mode. Otherwise such a model takes the
    nn.Sequential fallback, which keeps the original forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    try:
        result, report = _fuse_traced(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "use the fallback"
        report = FuseReport(method="sequential", trace_error=f"{type(err).__name__}: {err}".splitlines()[0])
        _fuse_sequentials(model, report)
        result = model
    setattr(result, REPORT_ATTR, report)
    logger.info("%s", report)
    return result


# ---- torch.fx path ------------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """The default tracer, with FusedConv2dReLU kept as one call (it is already fused)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, FusedConv2dReLU) or super().is_leaf_module(m, qualname)


class ModeDependentGraphError(RuntimeError):
    """The traced forward differs between train and eval mode (it branches on ``self.training``).

    ``eval_graph`` is the graph traced with the current flags when it equals the all-eval trace, else None.
    """

    def __init__(self, message: str, eval_graph: fx.Graph | None = None):
        super().__init__(message)
        self.eval_graph = eval_graph


def _fuse_traced(model: nn.Module) -> tuple[fx.GraphModule, FuseReport]:
    """The torch.fx path of :func:`fuse`; raises when the model takes the nn.Sequential fallback."""
    try:
        graph = _trace_mode_independent(model)
    except ModeDependentGraphError as err:
        if err.eval_graph is None:
            raise
        eval_code = err.eval_graph.python_code("self").src
        report = FuseReport(method="fx", frozen_mode="eval")
        result = _fuse_graph(model, err.eval_graph, report)  # (edits the graph, leaves model as it was)
        if not _eval_graph_stays(model, eval_code, report):
            raise
        return result, report
    report = FuseReport(method="fx")
    return _fuse_graph(model, graph, report), report


def _traced_code(model: nn.Module, training: dict[nn.Module, bool] | None = None) -> str:
    """The Python source of ``model``'s fx trace, traced with the given ``training`` flags (restored after)."""
    if training is None:
        return _Tracer().trace(model).python_code("self").src
    flags = {m: m.training for m in model.modules()}
    try:
        for m, mode in training.items():
            m.training = mode  # the flag itself: a folded FusedConv2dReLU's train() would refuse
        return _traced_code(model)
    finally:
        for m, flag in flags.items():
            m.training = flag


def _trace_mode_independent(model: nn.Module) -> fx.Graph:
    """The fx graph of ``model``'s forward, checked to be the same with every module in train and in eval mode.

    fx records only the branch taken on ``self.training`` (dropout's flag, an auxiliary head, stochastic depth), so
    a graph that depends on the mode would keep the traced mode's behaviour after a later ``.train()``/``.eval()``.
    Such a model raises ModeDependentGraphError (carrying the graph when it is the eval one).
    """
    graph = _Tracer().trace(model)
    current = graph.python_code("self").src
    modules = list(model.modules())
    in_train = _traced_code(model, dict.fromkeys(modules, True))
    in_eval = _traced_code(model, dict.fromkeys(modules, False))
    if len({current, in_train, in_eval}) > 1:
        raise ModeDependentGraphError(
            "its traced forward differs between train and eval mode (it branches on self.training), so a graph "
            "traced in one mode would be wrong in the other",
            eval_graph=graph if current == in_eval else None,
        )
    return graph


def _eval_graph_stays(model: nn.Module, eval_code: str, report: FuseReport) -> bool:
    """Whether the fused eval graph cannot be switched to train mode behind its back.

    ``train()`` raises on any module holding a folded BatchNorm. Every other module (its ``train()`` still allowed)
    is set to training: the trace must not change.
    """
    folded = [name for name, kind in report.fused if kind == "conv+bn+relu"]
    if not folded:
        return False

    def holds_folded(name: str) -> bool:
        return any(not name or f == name or f.startswith(name + ".") for f in folded)

    training = {m: not holds_folded(name) for name, m in model.named_modules()}
    return _traced_code(model, training) == eval_code


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    return False


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


_HOOK_KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooks_reason(module: nn.Module, role: str) -> str | None:
    """Why ``module`` (the convolution, BatchNorm or ReLU of a chain) must stay: it has hooks, which fusing it away
    (or replacing it) would silently stop from running."""
    kinds = [kind.strip("_").replace("_", " ") for kind in _HOOK_KINDS if getattr(module, kind, None)]
    return f"the {role} has {' and '.join(kinds)}" if kinds else None


def _relu_input(node: fx.Node):
    """The tensor a ReLU call node takes (positional, or the keyword ``input``)."""
    return node.args[0] if node.args else node.kwargs.get("input")


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _match(conv_node: fx.Node, modules: dict[str, nn.Module]):
    """``(bn_node or None, relu_node)`` if conv_node starts a fusable chain, else a string saying why not."""
    conv = modules[conv_node.target]
    reason = unsupported_reason(conv)
    if reason is not None:
        return reason
    reason = _hooks_reason(conv, "convolution")
    if reason is not None:
        return reason
    nxt = _single_user(conv_node)
    if nxt is None:
        return f"its output has {len(conv_node.users)} users (fusing would change what the others see)"
    if nxt.op == "call_module" and type(modules.get(nxt.target)) is nn.BatchNorm2d:
        bn = modules[nxt.target]
        if bn.training:
            return "followed by BatchNorm2d in training mode (call .eval() before fuse() to fold it)"
        if bn.running_mean is None or bn.running_var is None:
            return "followed by BatchNorm2d without running statistics (track_running_stats=False)"
        reason = _hooks_reason(bn, "BatchNorm2d after it")
        if reason is not None:
            return reason
        relu = _single_user(nxt)
        if relu is None:
            return f"its BatchNorm2d output has {len(nxt.users)} users"
        if not _is_relu(relu, modules) or _relu_input(relu) is not nxt:
            return f"followed by BatchNorm2d, then {_describe(relu, modules)}, not a ReLU"
        return _relu_hooks_reason(relu, modules) or (nxt, relu)
    if not _is_relu(nxt, modules) or _relu_input(nxt) is not conv_node:
        return f"followed by {_describe(nxt, modules)}, not a ReLU"
    return _relu_hooks_reason(nxt, modules) or (None, nxt)


def _relu_hooks_reason(relu: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if relu.op != "call_module":
        return None
    return _hooks_reason(modules[relu.target], f"ReLU after it ({relu.target})")


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> FusedConv2dReLU:
    """A FusedConv2dReLU computing relu(bn(conv(x))) with the eval BatchNorm folded into weight and bias."""
    fused = FusedConv2dReLU.from_conv(conv)
    with torch.no_grad():
        w = conv.weight.detach().double()
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                                  device=w.device)
        inv_std = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(inv_std)
        scale = gamma * inv_std
        new_w = w * scale.reshape(-1, 1, 1, 1)
        new_b = (b - bn.running_mean.detach().double()) * scale + beta
    fused.weight = nn.Parameter(new_w.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(new_b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    fused.inference_only = True
    fused.training = False
    return fused


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)


def _fuse_graph(model: nn.Module, graph: fx.Graph, report: FuseReport) -> fx.GraphModule:
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    for name, module in gm.named_modules():  # fx's placeholder containers start in training mode: copy the flags
        if type(module) is nn.Module or module is gm:
            module.training = model.get_submodule(name).training
    modules = dict(gm.named_modules())
    conv_sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            conv_sites.setdefault(node.target, []).append(node)
        elif node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            report.skipped.append((node.name, "a functional conv2d call (only nn.Conv2d modules are fused)"))

    folded_bns: set[str] = set()
    for target, sites in conv_sites.items():
        matches = [_match(node, modules) for node in sites]
        why = next((m for m in matches if isinstance(m, str)), None)
        if why is None and len(sites) > 1 and any(bn is not None for bn, _ in matches):
            why = f"the module is called at {len(sites)} places and a BatchNorm would be folded into it"
        if why is not None:
            if len(sites) > 1 and not why.startswith("the module is called"):
                why = f"called at {len(sites)} places, not all fusable: {why}"
            report.skipped.append((target, why))
            continue
        conv = modules[target]
        bn_node = matches[0][0]
        if bn_node is None:
            _set_submodule(gm, target, FusedConv2dReLU.from_conv(conv))
        else:
            _set_submodule(gm, target, _fold_bn(conv, modules[bn_node.target]))
        for conv_node, (bn_node, relu_node) in zip(sites, matches):
            relu_node.replace_all_uses_with(conv_node)
            gm.graph.erase_node(relu_node)
            if bn_node is not None:
                bn_node.replace_all_uses_with(conv_node)
                gm.graph.erase_node(bn_node)
                folded_bns.add(bn_node.target)
        report.fused.append((target, "conv+relu" if bn_node is None else "conv+bn+relu"))

    still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in folded_bns - still_called:
        gm.delete_submodule(target)
    gm.graph.lint()
    gm.recompile()
    _restore_unused_state(model, gm, dropped=folded_bns - still_called)
    return gm


def _restore_unused_state(model: nn.Module, gm: fx.GraphModule, dropped: set[str]) -> None:
    """Copy modules, parameters and buffers that forward never touches (fx drops them) so state_dict keys stay."""
    have = set(gm.state_dict().keys())
    for key in model.state_dict().keys():
        owner, _, attr = key.rpartition(".")
        if key in have or any(owner == d or owner.startswith(d + ".") for d in dropped):
            continue
        try:
            gm.get_submodule(owner)
        except AttributeError:
            _copy_path(model, gm, owner)  # the whole module was unused: copy it (and its state) over
        else:
            source = model.get_submodule(owner)
            target = gm.get_submodule(owner) if owner else gm
            if attr in source._parameters:
                target.register_parameter(attr, source._parameters[attr])
            elif attr in source._buffers:
                target.register_buffer(attr, source._buffers[attr])
        have = set(gm.state_dict().keys())


def _copy_path(model: nn.Module, gm: nn.Module, path: str) -> None:
    parts = path.split(".")
    here, there = gm, model
    for i, part in enumerate(parts):
        there = getattr(there, part)
        if i == len(parts) - 1:
            setattr(here, part, there)
        else:
            if not hasattr(here, part):
                setattr(here, part, nn.Module())
            here = getattr(here, part)


# ---- fallback: nn.Sequential walk ---------------------------------------------------------------------------------


def _fuse_sequentials(model: nn.Module, report: FuseReport) -> None:
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules.keys())
        # A subclass with a forward of its own may use its children in any order: nothing in it is fused.
        own_forward = type(seq).forward is not nn.Sequential.forward
        for i, key in enumerate(keys):
            conv = seq._modules[key]
            if not isinstance(conv, nn.Conv2d):
                continue
            name = f"{seq_name}.{key}" if seq_name else key
            if own_forward:
                why = f"its container {type(seq).__name__} overrides nn.Sequential.forward"
            else:
                why = _match_sequential(seq, keys, i)
            if isinstance(why, str):
                report.skipped.append((name, why))
                continue
            bn_key, relu_key = why
            if bn_key is None:
                seq._modules[key] = FusedConv2dReLU.from_conv(conv)
            else:
                seq._modules[key] = _fold_bn(conv, seq._modules[bn_key])
                seq._modules[bn_key] = nn.Identity()
            seq._modules[relu_key] = nn.Identity()
            report.fused.append((name, "conv+relu" if bn_key is None else "conv+bn+relu"))


def _match_sequential(seq: nn.Sequential, keys: list[str], i: int):
    conv = seq._modules[keys[i]]
    reason = unsupported_reason(conv)
    if reason is not None:
        return reason
    reason = _hooks_reason(conv, "convolution")
    if reason is not None:
        return reason
    following = [seq._modules[k] for k in keys[i + 1 : i + 3]]
    if not following:
        return "last module of its nn.Sequential (no ReLU after it)"
    if type(following[0]) is nn.ReLU:
        return _hooks_reason(following[0], f"ReLU after it ({keys[i + 1]})") or (None, keys[i + 1])
    if type(following[0]) is nn.BatchNorm2d:
        bn = following[0]
        if bn.training:
            return "followed by BatchNorm2d in training mode (call .eval() before fuse() to fold it)"
        if bn.running_mean is None or bn.running_var is None:
            return "followed by BatchNorm2d without running statistics (track_running_stats=False)"
        reason = _hooks_reason(bn, "BatchNorm2d after it")
        if reason is not None:
            return reason
        if len(following) > 1 and type(following[1]) is nn.ReLU:
            return _hooks_reason(following[1], f"ReLU after it ({keys[i + 2]})") or (keys[i + 1], keys[i + 2])
        nxt = type(following[1]).__name__ if len(following) > 1 else "the end of the Sequential"
        return f"followed by BatchNorm2d, then {nxt}, not a ReLU"
    return f"followed by {type(following[0]).__name__}, not a ReLU"
