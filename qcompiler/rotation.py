"""``qcompiler.rotate``: fold a randomized Hadamard rotation of the residual stream into a model's
weights (QuaRot / SpinQuant's offline rotation), found from the graph (``passes/residual_stream.py``).

With ``Q`` orthogonal (``random_hadamard``), the stream ``x`` becomes ``x Q``: embedding tables
``E -> E Q``; linears adding into the stream ``W -> Q^T W``, ``b -> Q^T b``; each norm's gain ``g`` is
first folded into the columns of the linears reading it (``W -> W diag(g)``, the gain set to one),
then those linears ``W -> W Q``. RMSNorm gives ``rms(x Q) = rms(x)``, so the float model computes the
same function (to float rounding), while its weights and activations have their outlier channels
spread over all channels: what makes them easier to quantize. A tied output head is untied (its
folded gain differs from the embedding's table). The model is changed in place, on its own device
and dtype; the arithmetic is float64.

``online=True`` also rotates the inputs of the linears that write the stream (their inputs come through an
attention or a gated product, where nothing folds): a forward pre-hook on each such module applies
``qcompiler::hadamard_transform`` (``D = online_hadamard(K)``, orthogonal) to its input, and its weight's
columns take ``D^T`` (``W -> W D^T``, so ``(W D^T)(D x) = W x``). The hook is traced into the graph like the
module's own code, so calibration, GPTQ and the compiled model all see the rotated input, and the
Triton target runs the transform as its kernel. ``remove_online`` takes the hooks off (the weights then
no longer compute the original function).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from qcompiler.algorithms.hadamard import has_hadamard, online_factors, online_hadamard, random_hadamard
from qcompiler.core.online_rotation import OnlineHadamard, online_modules
from qcompiler.errors import UnsupportedError
from qcompiler.pipeline import META_KEY, Analysis, PassContext
from qcompiler.recipes import Recipe

__all__ = ["rotate", "RotationResult", "rotation_of", "apply_recipe_rotation", "check_rotated", "OnlineHadamard",
           "remove_online", "online_modules"]

log = logging.getLogger(__name__)

#: where ``rotate`` records what it did on the model (``model.__dict__``, not a module attribute)
ROTATION_ATTR = "_qcompiler_rotation"


@dataclass
class RotationResult:
    """What ``rotate`` changed, by parameter name."""

    hidden: int
    seed: int
    embeddings: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    norms_folded: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    online: list[str] = field(default_factory=list)
    online_refused: dict[str, str] = field(default_factory=dict)
    value_heads: list[str] = field(default_factory=list)
    value_heads_refused: dict[str, str] = field(default_factory=dict)
    per_head: bool = False

    @property
    def has_online(self) -> bool:
        return bool(self.online or self.online_refused)

    def summary(self) -> str:
        return (f"rotated the residual stream (hidden {self.hidden}, randomized Hadamard, seed {self.seed}): "
                f"{len(self.embeddings)} embedding table(s), {len(self.writers)} writing linears, "
                f"{len(self.readers)} reading linears, {len(self.norms_folded)} norm gains folded"
                + (f", untied {self.untied}" if self.untied else "")
                + (f"; online Hadamard on the inputs of {len(self.online)} writing linears" if self.online else "")
                + (f"; no online transform for {self.online_refused}" if self.online_refused else "")
                + (f"; per-head rotation of {len(self.value_heads)} attention value paths" if self.value_heads else "")
                + (f"; no per-head rotation for {self.value_heads_refused}" if self.value_heads_refused else ""))


def remove_online(model: torch.nn.Module) -> None:
    """Take the online transforms' hooks off ``model`` (``rotate(..., online=True)``)."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_pre_hooks.items() if isinstance(hook, OnlineHadamard)]:
            del module._forward_pre_hooks[key]


def _capture(model: torch.nn.Module, example_input):
    """(graph, annotation, parameter names by id) of ``model``'s forward on ``example_input``."""
    from qcompiler.passes.annotate import Annotate
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    graphs = []

    def capture(gm, example_inputs):
        ctx = PassContext(Recipe(name="rotation-probe"), list(example_inputs),
                          analyses={Analysis.PARAM_NAMES: names})
        Annotate().run(gm, ctx)
        graphs.append((gm, ctx.analyses[Analysis.ANNOTATE]))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=capture, dynamic=False)(**example_input)
    finally:
        torch._dynamo.reset()
    if len(graphs) != 1:
        raise UnsupportedError(f"qcompiler.rotate: the forward was captured as {len(graphs)} graphs (graph breaks); "
                               "the residual stream must be seen whole")
    return graphs[0][0], graphs[0][1], names


def rotate(model: torch.nn.Module, seed: int = 0, example_input: dict | torch.Tensor | None = None,
           online: bool = False, per_head: bool = False) -> RotationResult:
    """Rotate ``model``'s residual stream in place (module docstring); returns what changed. ``online``:
    also an online Hadamard transform on each writing linear's input (a linear whose input size has no
    online transform, or whose weight is not its own module's, keeps its input as is: ``online_refused``).
    ``per_head``: also a randomized Hadamard of the head size on each attention's values, folded into the
    value projection's rows and the output linear's columns (SpinQuant's R2; ``passes/value_heads.py``;
    paths it cannot prove: ``value_heads_refused``).

    Raises:
        UnsupportedError: the graph does not allow the fold (LayerNorm reading the stream, a norm writing
            it, graph breaks; the message names the node), or the hidden size has no Hadamard matrix here.
    """
    from qcompiler.passes.residual_stream import RotationRefused, find_residual_stream
    if example_input is None:
        example_input = torch.zeros(1, 8, dtype=torch.long)
    if isinstance(example_input, torch.Tensor):
        example_input = {"input_ids": example_input if example_input.dim() == 2 else example_input[None]}
    device = next(model.parameters()).device
    example_input = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example_input.items()}
    gm, ann, names = _capture(model, example_input)
    try:
        stream = find_residual_stream(gm, ann)
    except RotationRefused as e:
        raise UnsupportedError(f"qcompiler.rotate: {e}") from None
    if not has_hadamard(stream.hidden):
        raise UnsupportedError(f"qcompiler.rotate: hidden size {stream.hidden} has no Hadamard matrix from Sylvester "
                               "and Paley-I blocks")
    q = random_hadamard(stream.hidden, seed)
    result = RotationResult(stream.hidden, seed, per_head=per_head)
    heads = _HeadFold(gm, ann, seed, result) if per_head else None
    hooks: list[tuple[torch.nn.Module, OnlineHadamard]] = []

    def param(node):
        return ann.values[node.name]

    def fqn(node):
        return ann.param_fqn[node.name]

    # the new value of every parameter, by role; a parameter with two roles (tied) gets one per name
    new: dict[str, torch.Tensor] = {}
    owner: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
        if name in new and not torch.equal(new[name], value):
            raise UnsupportedError(f"qcompiler.rotate: parameter {name} has two roles in the residual stream that "
                                   "need different rotated values")
        new[name], owner[name] = value, tensor

    for e in stream.embeddings:
        table = param(e.args[1])
        name = _name_for(e.args[1], e.meta[META_KEY].fqn, names, table, fqn)
        put(name, table, table.double() @ q)
        result.embeddings.append(name)
    for w in stream.writers:
        weight_node = next(n for n in gm.graph.nodes if n.name == ann.linear_weight[w.name])
        weight, transposed = param(weight_node), ann.weights[w.meta[META_KEY].fqn].transposed
        w64 = weight.double().t() if transposed else weight.double()          # [d, K]
        out = q.t() @ w64
        if heads is not None:
            out = heads.columns(w, out)
        if online:
            out = _online_fold(model, ann.param_fqn[weight_node.name], out, result, hooks)
        put(ann.param_fqn[weight_node.name], weight, out.t() if transposed else out)
        bias = _bias_node(w)
        if bias is not None:
            put(ann.param_fqn[bias.name], param(bias), q.t() @ param(bias).double())
        result.writers.append(ann.param_fqn[weight_node.name])
    for norm, readers in stream.norms.items():
        gain_node = ann.norm_gain.get(norm.name)
        gain = _gain_value(norm, gain_node, ann)
        for r in readers:
            weight_node = next(n for n in gm.graph.nodes if n.name == ann.linear_weight[r.name])
            weight = param(weight_node)
            transposed = ann.weights[r.meta[META_KEY].fqn].transposed
            w64 = weight.double().t() if transposed else weight.double()      # [N, d]
            out = (w64 * gain[None, :]) @ q
            if heads is not None:
                out = heads.rows(r, out, put)
            name = _name_for(weight_node, r.meta[META_KEY].fqn, names, weight, fqn)
            put(name, weight, out.t() if transposed else out)
            result.readers.append(name)
        for name, tensor, value in _unit_gain(norm, gain_node, ann):
            put(name, tensor, value)
        result.norms_folded.append(norm.meta[META_KEY].fqn or norm.name)
    if heads is not None:
        heads.rest(put)
    _apply(model, new, owner, names, result)
    for module, hook in hooks:
        module.register_forward_pre_hook(hook)
    model.__dict__[ROTATION_ATTR] = result
    return result


def _online_fold(model, weight_name: str, w64: torch.Tensor, result: RotationResult, hooks: list) -> torch.Tensor:
    """``w64`` [N, K] with ``D^T`` folded into its columns, and the module's hook queued; ``w64`` as is
    (and the reason recorded) when there is no transform of order K or no module to hook."""
    module_path, _, attr = weight_name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    k = w64.shape[1]
    if attr != "weight" or not isinstance(module, torch.nn.Linear) and type(module).__name__ != "Conv1D":
        result.online_refused[weight_name] = (f"the weight belongs to a {type(module).__name__}, whose input "
                                              "is not the linear's alone")
        return w64
    if online_factors(k) is None:
        result.online_refused[weight_name] = f"no online Hadamard transform of order {k}"
        return w64
    h_block, dense, scale = online_hadamard(k)
    hooks.append((module, OnlineHadamard(h_block.to(w64.device), scale)))
    result.online.append(weight_name)
    return w64 @ dense.to(w64.device).t()


class _HeadFold:
    """The per-head rotations of ``rotate(per_head=True)``: each value path's ``R`` (a randomized Hadamard of the
    head size) folded into the rows of its value projection (``rows``) and the columns of the linear reading the
    attention (``columns``), on top of whatever the residual rotation made of those weights; ``rest`` folds the
    ones no stream role reached, from their own weights."""

    def __init__(self, gm, ann, seed: int, result: RotationResult):
        from qcompiler.passes.value_heads import find_value_heads
        self.ann, self.seed = ann, seed
        paths, refused = find_value_heads(gm, ann)
        self.by_producer, self.by_consumer = {}, {}
        for p in paths:
            if not has_hadamard(p.head_dim):
                refused[p.consumer.meta[META_KEY].fqn] = f"head size {p.head_dim} has no Hadamard matrix here"
                continue
            self.by_producer.setdefault(p.producer.name, []).append(p)
            self.by_consumer[p.consumer.name] = p
            result.value_heads.append(f"{p.producer.meta[META_KEY].fqn} -> {p.consumer.meta[META_KEY].fqn} "
                                      f"(head size {p.head_dim})")
        result.value_heads_refused.update(refused)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.done: set[str] = set()
        self.matrices: dict[int, torch.Tensor] = {}

    def _r(self, d: int) -> torch.Tensor:
        if d not in self.matrices:                        # not the stream's Q (another seed, another order)
            self.matrices[d] = random_hadamard(d, self.seed + 1)
        return self.matrices[d]

    def _weight(self, linear):
        node = self.nodes[self.ann.linear_weight[linear.name]]
        return node, self.ann.values[node.name], self.ann.weights[linear.meta[META_KEY].fqn].transposed

    def rows(self, linear, w64: torch.Tensor, put) -> torch.Tensor:
        """``w64`` [N, K] of a value projection with ``R^T`` on each head's rows (its bias too, through ``put``)."""
        paths = self.by_producer.get(linear.name)
        if not paths:
            return w64
        self.done.add(linear.name)
        starts = sorted({s for p in paths for s in p.producer_blocks})
        d = paths[0].head_dim
        rt = self._r(d).to(w64).t()

        def head_rows(x: torch.Tensor) -> torch.Tensor:     # [N, K] weight or [N] bias
            out = x.clone()
            for s in starts:
                out[s:s + d] = rt @ x[s:s + d]
            return out

        bias = _bias_node(linear)
        if bias is not None:
            b = self.ann.values[bias.name]
            put(self.ann.param_fqn[bias.name], b, head_rows(b.double()))
        return head_rows(w64)

    def columns(self, linear, w64: torch.Tensor) -> torch.Tensor:
        """``w64`` [N, K] of the linear reading an attention, with ``R`` on each head's columns."""
        p = self.by_consumer.get(linear.name)
        if p is None:
            return w64
        self.done.add(linear.name)
        d = p.head_dim
        r = self._r(d).to(w64)
        out = w64.clone()
        for b in range(len(p.blocks)):
            out[:, b * d:(b + 1) * d] = w64[:, b * d:(b + 1) * d] @ r
        return out

    def rest(self, put) -> None:
        """The value projections and output linears neither stream role folded, from their own weights."""
        for name, linear in [(n, self.nodes[n]) for n in list(self.by_producer) + list(self.by_consumer)]:
            if name in self.done:
                continue
            node, weight, transposed = self._weight(linear)
            w64 = weight.double().t() if transposed else weight.double()
            out = self.rows(linear, w64, put) if name in self.by_producer else w64
            out = self.columns(linear, out) if name in self.by_consumer else out
            put(self.ann.param_fqn[node.name], weight, out.t() if transposed else out)


def rotation_of(model: torch.nn.Module) -> RotationResult | None:
    """What ``rotate`` did to ``model``, or None if it was never rotated."""
    return model.__dict__.get(ROTATION_ATTR)


def apply_recipe_rotation(model: torch.nn.Module, recipe: Recipe, example_input=None) -> RotationResult | None:
    """Rotate ``model`` as ``recipe.rotation`` asks, once: a model already rotated with the same seed is
    left as is (a second rotation would not be wrong, but the recipe names one); another seed is an error."""
    spec = recipe.rotation
    if spec is None:
        return None
    _warn_static_online(recipe)
    done = rotation_of(model)
    if done is not None:
        _check_same(done, recipe)
        return done
    return rotate(model, seed=spec.seed, example_input=example_input, online=spec.online, per_head=spec.per_head)


def _warn_static_online(recipe: Recipe) -> None:
    """Online transforms turn an input's channel outliers into token outliers, which a static per-tensor
    activation scale cannot hold (SmolLM2: ``w8a8-int8-sq+rot-online`` +9-10%, the per-token dynamic
    ``w8a8-int8-sq-dynamic+rot-online`` +0.23%; README, Rotations)."""
    act = recipe.activation
    if recipe.rotation.online and act is not None and not act.dynamic:
        log.warning("recipe %r: online Hadamard transforms with static %s activations: the transforms spread a "
                    "token's outliers over all its channels, which one static scale per tensor cannot hold "
                    "(SmolLM2: +9%% perplexity, against +0.2%% with per-token dynamic activations); prefer a "
                    "dynamic per-token preset (e.g. w8a8-int8-sq-dynamic+rot-online)", recipe.name,
                    act.granularity.value)


def _check_same(done: RotationResult, recipe: Recipe) -> None:
    spec = recipe.rotation
    if done.seed != spec.seed:
        raise UnsupportedError(f"recipe {recipe.name!r} rotates with seed {spec.seed}, but the model was already "
                               f"rotated with seed {done.seed}")
    if done.has_online != spec.online:
        raise UnsupportedError(f"recipe {recipe.name!r} rotates {'with' if spec.online else 'without'} online "
                               f"transforms, but the model was rotated {'with' if done.has_online else 'without'} "
                               f"them (qcompiler.rotate(model, online={spec.online}))")
    if done.per_head != spec.per_head:
        raise UnsupportedError(f"recipe {recipe.name!r} rotates {'with' if spec.per_head else 'without'} per-head "
                               f"rotations of the values, but the model was rotated {'with' if done.per_head else 'without'} "
                               f"them (qcompiler.rotate(model, per_head={spec.per_head}))")


def check_rotated(model: torch.nn.Module | None, recipe: Recipe) -> None:
    """Refuse to quantize, under a recipe with a rotation, a model that was not rotated: a
    ``torch.compile`` backend sees the model only once its graph is captured, too late to change it."""
    if recipe.rotation is None:
        return
    if model is None:
        raise UnsupportedError(f"recipe {recipe.name!r} rotates the residual stream: compile a module "
                               "(torch.compile(model, ...)) rotated with qcompiler.rotate, or use qcompiler.quantize")
    done = rotation_of(model)
    if done is None:
        raise UnsupportedError(f"recipe {recipe.name!r} rotates the residual stream, which changes the model's weights "
                               "before its graph is captured: call qcompiler.rotate(model, seed="
                               f"{recipe.rotation.seed}" + (", online=True" if recipe.rotation.online else "")
                               + (", per_head=True" if recipe.rotation.per_head else "")
                               + ") before torch.compile, or use qcompiler.quantize(model, recipe)")
    _check_same(done, recipe)


def _name_for(node, role_fqn: str, names: dict[int, list[str]], tensor: torch.Tensor, fqn) -> str:
    """The parameter name of ``node`` for the module ``role_fqn`` (tied parameters have several names)."""
    for n in names.get(id(tensor), []):
        if n.rsplit(".", 1)[0] == role_fqn:
            return n
    return fqn(node)


def _bias_node(linear):
    from qcompiler.passes.annotate import linear_parts
    parts = linear_parts(linear, {a.name for a in linear.all_input_nodes if a.op == "placeholder"})
    return parts.bias if parts is not None else None


def _gain_value(norm, gain_node, ann) -> torch.Tensor:
    from qcompiler.passes.annotate import eval_param_node
    if gain_node is not None:
        return eval_param_node(gain_node, ann.values).double().reshape(-1)
    weight = norm.kwargs.get("weight", norm.args[2] if len(norm.args) > 2 else None)     # rms_norm(x, shape, w, eps)
    if weight is None:
        return torch.ones(1, dtype=torch.float64)
    return eval_param_node(weight, ann.values).double().reshape(-1)


def _unit_gain(norm, gain_node, ann) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """New values of the gain's parameters that make the gain one: the gain itself (``w`` -> ones) or
    the parameter of ``1 + w`` (-> zeros), checked by evaluating the gain again."""
    from qcompiler.passes.annotate import eval_param_node
    node = gain_node if gain_node is not None else norm.kwargs.get("weight", norm.args[2] if len(norm.args) > 2 else None)
    if node is None:
        return []
    placeholders = [n for n in _param_ancestors(node) if n.name in ann.values]
    if len(placeholders) != 1:
        raise UnsupportedError(f"qcompiler.rotate: the gain of norm {norm.name} depends on {len(placeholders)} "
                               "parameters; cannot set it to one")
    p = placeholders[0]
    for candidate in (torch.ones_like(ann.values[p.name]), torch.zeros_like(ann.values[p.name])):
        if torch.equal(eval_param_node(node, {**ann.values, p.name: candidate}).double(),
                       torch.ones_like(eval_param_node(node, ann.values)).double()):
            return [(ann.param_fqn[p.name], ann.values[p.name], candidate.double())]
    raise UnsupportedError(f"qcompiler.rotate: no value of {ann.param_fqn[p.name]} makes the gain of norm {norm.name} "
                           "one (neither w nor 1 + w)")


def _param_ancestors(node):
    out, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            out.append(n)
        stack.extend(n.all_input_nodes)
    return out


def _apply(model, new: dict[str, torch.Tensor], owner: dict[str, torch.Tensor], names, result) -> None:
    """Write the new values: in place where every name of a parameter gets the same value, else
    (tied parameters with different roles) each name its own ``Parameter``."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in owner.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    with torch.no_grad():
        for tid, assigned in by_tensor.items():
            tensor = owner[assigned[0]]
            all_names = names.get(tid, assigned)
            values = {n: new[n] for n in assigned}
            same = len({id(v) for v in values.values()}) == 1 or all(
                torch.equal(v, values[assigned[0]]) for v in values.values())
            if same and set(assigned) >= set(all_names):
                tensor.copy_(values[assigned[0]].to(tensor.dtype))
                continue
            for n in all_names:          # untie: every name its own parameter
                module_path, _, attr = n.rpartition(".")
                module = model.get_submodule(module_path) if module_path else model
                value = values.get(n)
                data = (value.to(tensor.dtype) if value is not None else tensor.detach().clone())
                setattr(module, attr, torch.nn.Parameter(data.to(tensor.device), requires_grad=tensor.requires_grad))
            result.untied.extend(sorted(all_names))
    config = getattr(model, "config", None)
    if result.untied and config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
