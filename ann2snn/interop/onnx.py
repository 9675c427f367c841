"""ONNX export of a converted network, in three formats:

- `single-step`: one time step for streaming runtimes that keep the state themselves. Inputs are the
  input frame `input`, the step index `t` (int64 scalar) and every state tensor (`<layer>.v`,
  `<layer>.count`, `<layer>.spike_count`, `<pool>.running_sum`, ...); outputs are this step's output
  contribution `output`, `t.next` and each state's new value `<state>.next`, to be fed back as `<state>`
  at the next step. At `t = 0` the model ignores the state inputs and starts from the initial state
  (membranes at `initial_membrane * v_threshold`, counters at zero), so the first call may pass zeros.
  A rate-coded network averages the outputs of steps `readout_start` .. T - 1 only (the metadata's
  config holds `readout_delay`: readout_start is floor(readout_delay x T)).
- `t-step`: the whole simulation of `snn(x)` inside the graph, an ONNX `Loop` of T steps. Outputs are
  `output` (for rate coding the time average over steps `readout_start` .. T - 1, recorded in the metadata;
  for accumulate coding the sum; as `snn(x)` returns) and
  every neuron layer's spike count per sample `<layer>.spike_count`.
- `qann`: the quantized ANN the SNN reproduces, as a plain feed-forward model.

Every model uses standard ONNX operators only (opset 18), passes `onnx.checker` with `full_check`, and
has static shapes except the batch dimension.

How: one time step of the network (static prefix, then spiking body) is written as a functional
torch module, state in and state out (`_FunctionalStep` runs the FX graphs and calls each temporal
module's declared state and step, `initial_state` and `single_step_forward`: see
`ann2snn.runtime.layers.TemporalModule`), and traced by the current torch.onnx exporter (`dynamo=True`:
torch.export, then onnxscript). The same trace also makes the frame the network's coding gives a static
image at step t (`Coding.frame`: the image at every step, or at step 0 only). That graph without the
frame is the single-step model; with `onnx.helper` it also becomes the body of the T-step model's
`Loop`, which feeds the step that frame of the image, and the Loop's sum is read out as the coding says
(a time average or the sum). So the static
prefix is recomputed at every step instead of once as `snn(x)` does: about 1 % of ResNet-20's work
(its first convolution), for one trace instead of two.

Why this way: torch.onnx covers every synaptic op the compiler accepts (convolutions, pooling,
padding, slicing, reshapes on a symbolic batch size) with standard operators, and since the neuron
dynamics are traced from the very code `snn.step` runs, the graph performs the same elementwise float
operations in the same order (only a runtime's convolution kernels may sum in another order); an
FX-to-ONNX builder of our own would re-implement all of that. torch.export cannot
express a loop over stateful steps, which ONNX's `Loop` does in a few nodes, and which keeps the T-step
file the size of the single-step one whatever T is (an unrolled graph grows with T). The legacy
TorchScript exporter (`dynamo=False`) is deprecated and not used.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from ann2snn.errors import ConversionError, describe_node
from ann2snn.io.atomic import atomic_write
from ann2snn.runtime.coding import Coding
from ann2snn.runtime.layers import TemporalModule, declares_step
from ann2snn.runtime.network import SpikingNetwork, check_steps

FORMATS = ("single-step", "t-step", "qann")
FILE_NAMES = {"t-step": "snn.onnx", "single-step": "snn-step.onnx", "qann": "qann.onnx"}
OPSET = 18
INPUT, OUTPUT, STEP = "input", "output", "t"
NEXT = ".next"

# the static image of the T-step model, and the step's input frame made of it (see `_Step`)
IMAGE, FRAME = "image", "frame"

State = dict[str, torch.Tensor]


def _module_step(module: TemporalModule, x: torch.Tensor, state: State | None,
                 t: torch.Tensor) -> tuple[torch.Tensor, State]:
    """One step of a temporal module as a function: its declared state loaded from `state` (the declared
    initial state at t = 0, or when `state` is None, at the first step of a layout run), its declared step
    (`single_step_forward`), and the state it leaves."""
    initial = module.initial_state(x)
    if state is not None:
        initial = {name: torch.where(t == 0, value, state[name]) for name, value in initial.items()}
    module.load_state(initial)
    try:
        return module.single_step_forward(x, t), module.state()
    finally:
        module.reset()


class _FunctionalStep(fx.Interpreter):
    """Runs one time step of a spiking graph with the state of its temporal modules passed in
    (`states`, keyed by module path, None for the initial state) and collected in `new_states`."""

    def __init__(self, gm: fx.GraphModule, t: torch.Tensor, states: dict[str, State] | None):
        super().__init__(gm)
        self.t, self.states = t, states
        self.new_states: dict[str, State] = {}
        self.node: fx.Node | None = None

    def run_node(self, node: fx.Node) -> Any:
        self.node = node
        return super().run_node(node)

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        if not isinstance(module, TemporalModule):
            return super().call_module(target, args, kwargs)
        if not declares_step(module):
            raise ConversionError(f"cannot export {describe_node(self.module, self.node)} to ONNX: no step handler: "
                                  f"{type(module).__name__} declares no single_step_forward")
        if target in self.new_states:
            raise ConversionError(f"cannot export {describe_node(self.module, self.node)} to ONNX: the stateful module "
                                  f"'{target}' is called more than once, so its state is ambiguous")
        out, new = _module_step(module, *args, None if self.states is None else self.states.get(target, {}), self.t)
        if new:
            self.new_states[target] = new
        return out


class _Step(nn.Module):
    """One time step of the whole network, functional: (frame, t, states, image) -> (output, new states,
    image frame), the states flat in the order of `layout` ((module path, state names) pairs). The image
    frame is what the network's coding makes of a static image at step t (`Coding.frame`): the T-step
    model feeds it to the step; the single-step model, whose input is the frame, leaves it out."""

    def __init__(self, snn: SpikingNetwork, layout: list[tuple[str, list[str]]]):
        super().__init__()
        self.prefix, self.body, self.coding, self.layout = snn.prefix, snn.body, snn.coding, layout

    def forward(self, frame: torch.Tensor, t: torch.Tensor, states: tuple[torch.Tensor, ...],
                image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_frame = self.coding.frame(image, t)
        flat = iter(states)
        nested = {target: {name: next(flat) for name in names} for target, names in self.layout}
        static = _FunctionalStep(self.prefix, t, nested).run(frame)
        body = _FunctionalStep(self.body, t, nested)
        out = body.run(*static)
        return (out, *(body.new_states[target][name] for target, names in self.layout for name in names),
                image_frame)


# ---------------------------------------------------------------------------------------------------
# Tracing with torch.onnx


def _torch_export(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                  dynamic_shapes: tuple, opset: int, what: str) -> onnx.ModelProto:
    try:
        with warnings.catch_warnings():
            # every input's batch dimension is the one Dim; torch.onnx notes that it named it once
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
            program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, verbose=False)
    except Exception as error:  # torch.export and onnxscript report failures as many exception types
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        reason = (str(root).strip().splitlines() or [type(root).__name__])[0]
        raise ConversionError(f"torch.onnx could not export the {what}: {reason}") from error
    return program.model_proto


def _batch_dynamic(tensors) -> tuple:
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in tensors)


def recorded_input_shape(snn: SpikingNetwork) -> tuple[int, ...] | None:
    """The per-sample input shape recorded when the network was traced (lost by save/load)."""
    placeholder = next(node for node in snn.prefix.graph.nodes if node.op == "placeholder")
    meta = placeholder.meta.get("tensor_meta")
    return tuple(meta.shape[1:]) if meta is not None else None


def _dtype(module: nn.Module) -> torch.dtype:
    return next((t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), torch.float32)


class _TracedStep:
    """One step of a network traced to ONNX (`model`: inputs input, t and the states; outputs output and
    the new states), with what assembling the exported models needs to know about it."""

    def __init__(self, snn: SpikingNetwork, example: torch.Tensor, opset: int):
        t = torch.tensor(0)
        layout_run = _FunctionalStep(snn.body, t, None)
        output = layout_run.run(*_FunctionalStep(snn.prefix, t, None).run(example))
        if not isinstance(output, torch.Tensor):
            raise ConversionError(f"cannot export to ONNX: the network returns a {type(output).__name__}, "
                                  "not one tensor")
        layout = [(target, list(state)) for target, state in layout_run.new_states.items()]
        initial = tuple(tensor for state in layout_run.new_states.values() for tensor in state.values())
        self.state_names = [f"{target}.{name}" for target, names in layout for name in names]
        self.spike_counts = [f"{target}.spike_count" for target, names in layout if "spike_count" in names]
        self.state_shapes = [tuple(tensor.shape[1:]) for tensor in initial]
        self.output_shape = tuple(output.shape[1:])
        self.dtype = helper.np_dtype_to_tensor_dtype(np.dtype(str(example.dtype).removeprefix("torch.")))
        batch = _batch_dynamic([example])[0]
        self.model = _torch_export(_Step(snn, layout), (example, t, initial, example.clone()),
                                   [INPUT, STEP, *self.state_names, IMAGE],
                                   [OUTPUT, *(n + NEXT for n in self.state_names), FRAME],
                                   (batch, {}, _batch_dynamic(initial), batch), opset, "spiking step")


# ---------------------------------------------------------------------------------------------------
# Assembling ONNX graphs


def _renamed(graph: onnx.GraphProto, rename: Callable[[str], str]) -> onnx.GraphProto:
    """A copy of `graph` with every value and node name passed through `rename` (subgraphs included)."""
    graph = copy.deepcopy(graph)

    def visit(g: onnx.GraphProto) -> None:
        for node in g.node:
            node.input[:] = [rename(name) if name else name for name in node.input]
            node.output[:] = [rename(name) if name else name for name in node.output]
            if node.name:
                node.name = rename(node.name)
            for attribute in node.attribute:
                for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    visit(subgraph)
        for value in [*g.input, *g.output, *g.value_info]:
            value.name = rename(value.name)
        for tensor in g.initializer:
            tensor.name = rename(tensor.name)

    visit(graph)
    return graph


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """The values a node reads, those its subgraphs read from the enclosing scopes included."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            for inner in subgraph.node:
                names |= _node_inputs(inner)
    return names


def _ordered(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` in an order where every value is made before it is read (topological, stable)."""
    made_by = {name: node for node in nodes for name in node.output}
    done: set[int] = set()
    order: list[onnx.NodeProto] = []

    def visit(node: onnx.NodeProto) -> None:
        stack = [(node, iter(sorted(_node_inputs(node))))]
        while stack:
            current, pending = stack[-1]
            for name in pending:
                producer = made_by.get(name)
                if producer is not None and id(producer) not in done:
                    stack.append((producer, iter(sorted(_node_inputs(producer)))))
                    break
            else:
                stack.pop()
                if id(current) not in done:
                    done.add(id(current))
                    order.append(current)

    for node in nodes:
        visit(node)
    return order


def _without(graph: onnx.GraphProto, inputs: set[str], outputs: set[str]) -> onnx.GraphProto:
    """A copy of `graph` without these inputs and outputs, and without the nodes and initializers only
    they needed."""
    graph = copy.deepcopy(graph)
    kept_outputs = [value for value in graph.output if value.name not in outputs]
    needed = {value.name for value in kept_outputs}
    kept_nodes = []
    for node in reversed(list(graph.node)):
        if needed & set(node.output):
            kept_nodes.append(node)
            needed |= _node_inputs(node)
    if needed & inputs:
        raise ValueError(f"the graph's remaining outputs read {sorted(needed & inputs)}")
    kept_initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    kept_inputs = [value for value in graph.input if value.name not in inputs]
    kept_info = [value for value in graph.value_info if value.name in needed]
    for field, kept in (("node", kept_nodes[::-1]), ("output", kept_outputs), ("initializer", kept_initializers),
                        ("input", kept_inputs), ("value_info", kept_info)):
        graph.ClearField(field)
        getattr(graph, field).extend(kept)
    return graph


def _value_info(graph: onnx.GraphProto, name: str, as_name: str | None = None) -> onnx.ValueInfoProto:
    info = copy.deepcopy(next(v for v in [*graph.input, *graph.output] if v.name == name))
    info.name = as_name or name
    return info


def _constant(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _model(graph: onnx.GraphProto, template: onnx.ModelProto, metadata: dict[str, Any], doc: str) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=template.opset_import, producer_name="ann2snn",
                              ir_version=template.ir_version, doc_string=doc)
    model.functions.extend(template.functions)
    helper.set_model_props(model, {f"ann2snn.{key}": value if isinstance(value, str) else json.dumps(value)
                                   for key, value in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


def _single_step_model(step: _TracedStep, metadata: dict[str, Any]) -> onnx.ModelProto:
    graph = _without(step.model.graph, {IMAGE}, {FRAME})
    graph.name = "snn_single_step"
    graph.node.append(helper.make_node("Add", [STEP, "snn/one"], [STEP + NEXT]))
    graph.initializer.append(_constant("snn/one", 1, np.int64))
    graph.output.insert(1, helper.make_tensor_value_info(STEP + NEXT, TensorProto.INT64, []))
    doc = ("One time step. Feed each output '<state>.next' back as input '<state>' (and 't.next' as 't') at the "
           "next step; at t = 0 the state inputs are ignored and may be zeros.")
    return _model(graph, step.model, {**metadata, "format": "single-step", "states": step.state_names}, doc)


def _t_step_model(step: _TracedStep, T: int, readout_start: int, coding: Coding,
                  metadata: dict[str, Any]) -> onnx.ModelProto:
    dtype, np_dtype = step.dtype, helper.tensor_dtype_to_np_dtype(step.dtype)
    # The step becomes the Loop body, its names under "step/": it reads the image from the outer graph and
    # feeds the step the frame its coding makes of it.
    renames = {IMAGE: INPUT, INPUT: f"step/{FRAME}"}
    body = _renamed(step.model.graph, lambda name: renames.get(name, f"step/{name}"))
    states = [f"step/{name}" for name in step.state_names]
    counted, read_out_nodes = f"step/{OUTPUT}", []
    if readout_start:  # steps before the read-out window add nothing to the sum
        counted = "step/counted_output"
        read_out_nodes = [
            helper.make_node("GreaterOrEqual", ["step/t", "snn/readout_start"], ["step/in_window"]),
            helper.make_node("Cast", ["step/in_window"], ["step/window_weight"], to=dtype),
            helper.make_node("Mul", [f"step/{OUTPUT}", "step/window_weight"], [counted])]
    loop_nodes = [*_ordered(list(body.node)), *read_out_nodes,
                   helper.make_node("Add", ["step/output_sum", counted], ["step/output_sum.next"]),
                   helper.make_node("Identity", ["step/cond"], ["step/cond.next"])]
    loop_body = helper.make_graph(
        loop_nodes, "snn_step",
        [helper.make_tensor_value_info("step/t", TensorProto.INT64, []),
         helper.make_tensor_value_info("step/cond", TensorProto.BOOL, []),
         *(_value_info(body, name) for name in states), _value_info(body, f"step/{OUTPUT}", "step/output_sum")],
        [helper.make_tensor_value_info("step/cond.next", TensorProto.BOOL, []),
         *(_value_info(body, name + NEXT) for name in states),
         _value_info(body, f"step/{OUTPUT}", "step/output_sum.next")],
        value_info=list(body.value_info))

    # The Loop starts from zero tensors [batch, ...] (the step ignores its state at t = 0), one per shape;
    # the step's weights stay in the outer graph, which a Loop body may read.
    nodes = [helper.make_node("Shape", [INPUT], ["snn/batch"], start=0, end=1)]
    initializers = [*body.initializer, _constant("snn/T", T, np.int64)]
    if readout_start:
        initializers.append(_constant("snn/readout_start", readout_start, np.int64))
    zeros: dict[tuple[int, ...], str] = {}
    for shape in [*step.state_shapes, step.output_shape]:
        if shape not in zeros:
            name = zeros[shape] = f"snn/zeros_{len(zeros)}"
            initializers.append(_constant(f"{name}/shape", shape, np.int64))
            nodes += [helper.make_node("Concat", ["snn/batch", f"{name}/shape"], [f"{name}/full_shape"], axis=0),
                      helper.make_node("ConstantOfShape", [f"{name}/full_shape"], [name],
                                       value=helper.make_tensor("value", dtype, [1], [0]))]
    final = [name if name in step.spike_counts else f"snn/final/{name}" for name in step.state_names]
    nodes.append(helper.make_node(
        "Loop", ["snn/T", "", *(zeros[shape] for shape in step.state_shapes), zeros[step.output_shape]],
        [*final, "snn/output_sum"], body=loop_body))
    if coding.averages:
        initializers.append(_constant("snn/T_float", T - readout_start, np_dtype))
        nodes.append(helper.make_node("Div", ["snn/output_sum", "snn/T_float"], [OUTPUT]))
    else:
        nodes.append(helper.make_node("Identity", ["snn/output_sum"], [OUTPUT]))
    graph = helper.make_graph(
        nodes, "snn_t_step", [_value_info(step.model.graph, INPUT)],
        [_value_info(body, f"step/{OUTPUT}", OUTPUT),
         *(_value_info(body, f"step/{name}", name) for name in step.spike_counts)],
        initializers)
    window = f" over steps {readout_start}..{T - 1}" if readout_start else ""
    doc = (f"{T} time steps on a static input: '{OUTPUT}' is the network output ("
           f"{coding.output_meaning}{window}), '<layer>.spike_count' the spikes per sample.")
    return _model(graph, step.model, {**metadata, "format": "t-step", "T": str(T),
                                      "readout_start": str(readout_start)}, doc)


def _qann_model(snn: SpikingNetwork, example: torch.Tensor, opset: int, metadata: dict[str, Any]) -> onnx.ModelProto:
    if snn.qann is None:
        raise ValueError("the network carries no QANN (snn.qann is None), so there is none to export")
    qann = copy.deepcopy(snn.qann).cpu().eval()
    exported = _torch_export(qann, (example.to(_dtype(qann)),), [INPUT], [OUTPUT], _batch_dynamic([example]), opset,
                             "QANN")
    graph = exported.graph
    graph.name = "qann"
    return _model(graph, exported, {**metadata, "format": "qann"},
                  "The quantized ANN (QCFS activations) that the spiking network reproduces.")


# ---------------------------------------------------------------------------------------------------
# Public API


def onnx_models(snn: SpikingNetwork, formats=FORMATS, *, input_shape: tuple[int, ...] | None = None,
                T: int | None = None, opset: int = OPSET) -> dict[str, onnx.ModelProto]:
    """The ONNX models of `snn` in each of `formats` (see the module docstring), checked by onnx.checker.

    `input_shape` is the per-sample input shape (C, H, W); by default the one recorded when the model
    was converted (a network reloaded from a file has none: pass it). `T` is the T-step model's number
    of steps (default `snn.T`)."""
    if not isinstance(snn, SpikingNetwork):
        raise TypeError(f"expected a SpikingNetwork, got {type(snn).__name__}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown ONNX format(s) {unknown or list(formats)}; choose from {FORMATS}")
    T = snn.T if T is None else T
    check_steps("T", T)
    if not 17 <= opset:
        raise ValueError(f"opset must be 17 or later, got {opset}")
    input_shape = input_shape or recorded_input_shape(snn)
    if input_shape is None:
        raise ValueError("the network's input shape is unknown (it was not recorded, e.g. after loading from a file): "
                         "pass input_shape=(C, H, W)")
    network = copy.deepcopy(snn).cpu().eval()  # tracing drives the neurons; the caller's state stays as it was
    network.reset()
    example = torch.zeros((2, *input_shape), dtype=_dtype(network))  # batch 2: torch.export fixes a batch of 1
    metadata = {"coding": network.coding.name, "config": network.config}
    models = {}
    if {"single-step", "t-step"} & set(formats):
        step = _TracedStep(network, example, opset)
        if "single-step" in formats:
            models["single-step"] = _single_step_model(step, metadata)
        if "t-step" in formats:
            models["t-step"] = _t_step_model(step, T, network.readout_start(T), network.coding, metadata)
    if "qann" in formats:
        models["qann"] = _qann_model(network, example, opset, metadata)
    return {f: models[f] for f in formats}


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `model` to `path` atomically (readers never see a partial file)."""
    path = Path(path)
    atomic_write(path, model.SerializeToString())
    return path


def export_onnx(snn: SpikingNetwork, path: str | Path, format: str = "t-step", **options) -> Path:
    """Write `snn` as an ONNX model in `format` ('t-step', 'single-step' or 'qann') to `path`.
    `options` are those of `onnx_models` (input_shape, T, opset)."""
    return save_onnx(onnx_models(snn, (format,), **options)[format], path)


def write_onnx_files(snn: SpikingNetwork, directory: str | Path, formats=FORMATS, **options) -> list[Path]:
    """Write each format to its file in `directory` (FILE_NAMES); returns the paths written."""
    directory = Path(directory)
    return [save_onnx(model, directory / FILE_NAMES[f]) for f, model in onnx_models(snn, formats, **options).items()]
