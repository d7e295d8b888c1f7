"""Lower the fixed-point network to Lava processes and run it with `Loihi2SimCfg(select_tag='fixed_pt')`.

Network: a `RingBuffer` (one frame, repeated every step) sends the graded input spikes
(`toolchain.core.fixed.encode_input`); each layer is one of our populations
(`targets.lava.process`) fed by one connection process per synapse, all into its `a_in`
(Lava sums an InPort's connections): `Dense` for dense synapses, `Sparse` for
convolutions (built with `lava.proc.conv.utils.conv_to_sparse` in Lava's own order, see
`connection_matrix`), `DelaySparse` for a synapse that must wait for the longer paths into
its layer (`FixedGraph.delays`), with a preceding sum-pool folded into the matrix (each
entry is still one 8-bit mantissa, as pools do not overlap). Weights are passed as `2*q`
with `weight_exp = weight_exp - 1`: Lava's fixed-point Dense/Sparse clip to [-256, 255] and
clear the lowest bit of mixed-sign weights, both of which leave `2*q` (|q| <= 127) intact,
and the shift by `weight_exp - 1` gives exactly the emulator's `sum(q*s) << weight_exp` (or
its floor, for negative exponents).

Timing: each connection adds one step of delay, so the layer at depth d (the longest path,
the others delayed to it) sees at Lava step t the input of step t - d. The network is built
once per number of steps T and streams samples one after the other: for each sample the
input frame is set and the network runs P = T + D steps (D the deepest layer's depth);
every population resets itself to v0 at phase `d` of each period of P steps, i.e. exactly
when the new sample's input reaches it (a delayed synapse still delivers the previous
sample's tail before that phase).
Phase d + k of layer d is logical step k (`targets.loihi.emulator` works in logical time),
so the readout at logical step T-1 reflects exactly T steps of input.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

import targets.lava  # noqa: F401  (fails with a clear ToolchainError when Lava is missing)
from toolchain.core.fixed import (
    FixedGraph,
    FixedLayer,
    FixedSynapse,
    Lowering,
    as_fixed,
    check_overflow_policy,
    encode_input,
    overflow_error,
)
from toolchain.core.target import GraphKind, Recording, SimOutput
from toolchain.errors import ToolchainError

TAGS = ("fixed_pt", "floating_pt")
MAX_DELAY = 63  # DelaySparse's limit (6 bits, as Loihi 2's synaptic delays)


def _pool_matrix(in_shape: tuple[int, ...], pool: tuple[int, int]) -> Any:
    """(pooled, in) 0/1 scipy matrix of a non-overlapping sum-pool on CHW-flattened vectors."""
    from scipy.sparse import csr_matrix

    c, h, w = in_shape
    ph, pw = h // pool[0], w // pool[1]
    ch, i, j, a, b = np.meshgrid(
        np.arange(c), np.arange(ph), np.arange(pw), np.arange(pool[0]), np.arange(pool[1]), indexing="ij"
    )
    rows = ((ch * ph + i) * pw + j).reshape(-1)
    cols = ((ch * h + i * pool[0] + a) * w + j * pool[1] + b).reshape(-1)
    return csr_matrix((np.ones(rows.size, np.int64), (rows, cols)), shape=(c * ph * pw, c * h * w))


def connection_matrix(syn: FixedSynapse, layer: FixedLayer) -> Any:
    """One of the layer's integer synapses as a scipy CSR matrix (out, in) over CHW-flattened vectors."""
    from lava.proc.conv.utils import conv_to_sparse
    from scipy.sparse import csr_matrix

    pooled = syn.pooled_shape
    n_in = int(np.prod(pooled))
    if syn.kind == "conv":
        # Lava's own order (its NCHW branch is broken in 0.10.0): a true convolution with kernels
        # (C_out, kW, kH, C_in) on (X, Y, C) tensors. Our kernels are PyTorch correlations
        # (C_out, C_in, kH, kW) on (C, H, W), so flip both spatial axes and transpose.
        kernel = syn.weight.astype(np.int64)[:, :, ::-1, ::-1].transpose(0, 3, 2, 1)
        c_in, h_in, w_in = pooled
        c_out, h_out, w_out = layer.shape
        dst, src, wgt = conv_to_sparse(
            (w_in, h_in, c_in),
            (w_out, h_out, c_out),
            np.ascontiguousarray(kernel),
            (syn.stride[1], syn.stride[0]),
            (syn.padding[1], syn.padding[0]),  # asymmetric padding: the output shape fixes right/bottom
            (syn.dilation[1], syn.dilation[0]),
            syn.groups,
        )
        # (X, Y, C)-flattened indices -> our (C, H, W)-flattened ones
        src = np.arange(n_in).reshape(c_in, h_in, w_in).transpose(2, 1, 0).reshape(-1)[src]
        dst = np.arange(layer.size).reshape(c_out, h_out, w_out).transpose(2, 1, 0).reshape(-1)[dst]
        matrix = csr_matrix((wgt.astype(np.int64), (dst, src)), shape=(layer.size, n_in))
    else:
        matrix = csr_matrix(syn.weight.astype(np.int64).reshape(layer.size, n_in))
    if syn.pool != (1, 1):
        matrix = (matrix @ _pool_matrix(tuple(syn.in_shape), syn.pool)).tocsr()
    matrix.eliminate_zeros()
    if matrix.nnz and np.abs(matrix.data).max() > 127:
        raise ToolchainError(f"layer {layer.name!r}: folded synapse has weights beyond 8 bits")  # pragma: no cover
    return matrix


@dataclass
class _Network:
    steps: int
    period: int
    ring: Any
    populations: dict[str, Any]
    connections: dict[str, Any]
    readout: Any
    started: bool = False
    overflow_seen: dict[str, int] = field(default_factory=dict)


class LavaTarget:
    """Implements `toolchain.core.target.Target` on the Lava CPU simulator; runs a `FixedGraph`.

    What it runs is chosen as in `targets.loihi.emulator.LoihiTarget`: the FixedGraph given to
    `prepare`, else `fixed`, else the float SNN lowered by `lower`. Options: `tag` ("fixed_pt",
    default, bit-exact with the emulator; or "floating_pt": the same network in float64 models),
    `record` (keep every IF layer's spikes per step per neuron, for `run_recorded`), `on_overflow`
    ("raise" or "saturate"), `fast_sparse` (default True: Sparse connections receive binary spikes
    as 1-bit graded payloads, same sums, faster CSR products). Call `close()` (or use it as a
    context manager) to stop the Lava runtime.
    """

    name: ClassVar[str] = "lava"
    graph_kind: ClassVar[GraphKind] = "fixed"

    def __init__(
        self,
        fixed: FixedGraph | None = None,
        lower: Lowering | None = None,
        tag: str = "fixed_pt",
        record: bool = False,
        on_overflow: str = "raise",
        fast_sparse: bool = True,
    ):
        if tag not in TAGS:
            raise ToolchainError(f"tag={tag!r}: choose one of {', '.join(TAGS)}")
        check_overflow_policy(on_overflow)
        self.preset = fixed
        self.lower = lower
        self.fixed = fixed
        self.tag = tag
        self.record = record
        self.records_spikes = record
        self.on_overflow = on_overflow
        self.fast_sparse = fast_sparse
        self.startup_seconds: float | None = None
        self.network: _Network | None = None
        self.overflows: dict[str, int] = {}
        self.seconds_per_sample: float | None = None
        self.build_seconds: float | None = None
        self._finalizer: Any = None

    # ----------------------------------------------------------------- build

    def prepare(self, graph: Any) -> None:
        self.fixed = as_fixed(graph, self.preset, self.lower, self.name)
        self.close()
        self.overflows = {layer.name: 0 for layer in self.fixed.layers}

    def _build(self, steps: int) -> _Network:
        from lava.proc.io.source import RingBuffer

        from targets.lava.process.process import Accumulator, IFReset

        fixed = self.fixed
        assert fixed is not None, "prepare() first"
        started = time.perf_counter()
        depth = fixed.depth
        period = steps + max(depth.values())
        fixed_pt = self.tag == "fixed_pt"
        n_in = int(np.prod(fixed.input_shape))
        ring = RingBuffer(data=np.zeros((n_in, 1), np.int32 if fixed_pt else np.float64))
        populations: dict[str | None, Any] = {None: ring}
        connections: dict[str, Any] = {}
        readout = None
        delays = fixed.delays()
        for layer in fixed.layers:
            conns = [
                self._connection(fixed, layer, k, syn, delays[layer.name][k]) for k, syn in enumerate(layer.synapses)
            ]
            size = (layer.size,)
            cast = (lambda a: a.astype(np.int64)) if fixed_pt else (lambda a: a.astype(np.float64))
            if layer.kind == "if":
                pop = IFReset(
                    shape=size,
                    vth=layer.threshold,
                    v0=cast(layer.v0.reshape(-1)),
                    bias_mant=cast(layer.bias_mant.reshape(-1)),
                    bias_exp=layer.bias_exp,
                    period=period,
                    offset=depth[layer.name],
                    window=steps,
                    record=self.record,
                    probe_buffer=period,
                    name=layer.name,
                )
            else:
                pop = Accumulator(
                    shape=size,
                    bias_mant=cast(layer.bias_mant.reshape(-1)),
                    bias_exp=layer.bias_exp,
                    period=period,
                    offset=depth[layer.name],
                    window=steps,
                    probe_buffer=period,
                    name=layer.name,
                )
                readout = pop
            for syn, conn in zip(layer.synapses, conns, strict=True):
                populations[syn.source].s_out.connect(conn.s_in)
                conn.a_out.connect(pop.a_in)
            populations[layer.name] = pop
            connections[layer.name] = conns
        assert readout is not None
        network = _Network(steps, period, ring, {k: v for k, v in populations.items() if k}, connections, readout)
        self.build_seconds = time.perf_counter() - started
        return network

    def _connection(self, fixed: FixedGraph, layer: FixedLayer, index: int, syn: FixedSynapse, delay: int) -> Any:
        """One synapse as a Lava connection process: Dense, Sparse, or DelaySparse where the synapse
        must wait `delay` more steps for the longer paths into its layer (`FixedGraph.delays`)."""
        from lava.proc.dense.process import Dense
        from lava.proc.sparse.process import DelaySparse, Sparse

        fixed_pt = self.tag == "fixed_pt"
        matrix = connection_matrix(syn, layer)
        graded = syn.source is None
        # Binary spikes as 1-bit graded payloads (0/1) give the same sums, but Lava's Sparse then
        # takes a CSR mat-vec instead of slicing columns, which is ~10x faster.
        binary_bits = 1 if (self.fast_sparse and (syn.kind != "dense" or delay)) else 0
        suffix = "" if len(layer.synapses) == 1 else f"{index}"
        options: dict[str, Any] = {
            "num_message_bits": fixed.input_bits if graded else binary_bits,
            "name": f"{layer.name}/synapse{suffix}",
        }
        if fixed_pt:
            matrix = matrix * 2
            options["weight_exp"] = syn.weight_exp - 1
        else:
            matrix = matrix.astype(np.float64) * 2.0**syn.weight_exp
        if delay:
            if delay > MAX_DELAY:
                raise ToolchainError(
                    f"layer {layer.name!r}: its synapse from {syn.source or 'the input'!r} needs {delay} steps of delay "
                    f"to meet its longer paths; Loihi 2 synapses delay at most {MAX_DELAY}"
                )
            delays = matrix.copy()
            delays.data[:] = delay
            return DelaySparse(weights=matrix, delays=delays.astype(np.int64), max_delay=delay, **options)
        if syn.kind == "dense":
            return Dense(weights=matrix.toarray(), **options)
        return Sparse(weights=matrix, **options)

    # ------------------------------------------------------------------- run

    def _network_for(self, steps: int) -> _Network:
        if self.network is not None and self.network.steps == steps:
            return self.network
        self.close()
        self.network = self._build(steps)
        return self.network

    def _run_sample(self, network: _Network, frame: np.ndarray) -> None:
        from lava.magma.core.run_conditions import RunSteps
        from lava.magma.core.run_configs import Loihi2SimCfg

        data = frame.reshape(-1, 1).astype(np.int32 if self.tag == "fixed_pt" else np.float64)
        if network.started:
            network.ring.data.set(data)
        else:  # no runtime before the first run: the frame becomes the initial value
            network.ring.data.init = data
        network.readout.run(condition=RunSteps(num_steps=network.period), run_cfg=Loihi2SimCfg(select_tag=self.tag))
        if not network.started:
            network.started = True
            self._finalizer = weakref.finalize(self, _stop, network.readout)  # also runs at exit

    def run_recorded(self, x: np.ndarray, steps: int) -> Recording:
        """Run a batch sample by sample; every IF layer's spikes per step per neuron in logical time
        (needs record=True), the readout accumulator, and overflow counts."""
        fixed = self.fixed
        assert fixed is not None, "prepare() first"
        network = self._network_for(steps)
        depth = fixed.depth
        x_u = encode_input(fixed, x)
        batch = len(x_u)
        counts = {layer.name: np.zeros(steps) for layer in fixed.if_layers}
        spikes = {layer.name: np.zeros((steps, batch, *layer.shape), bool) for layer in fixed.if_layers} if self.record else {}
        readout = np.zeros((steps, batch, fixed.layer(fixed.output).size), np.int64)
        started = time.perf_counter()
        first = network.started
        for b in range(batch):
            if b == 1 and not first:  # the first run compiled and started the runtime
                self.startup_seconds = time.perf_counter() - started
                started = time.perf_counter()
            self._run_sample(network, x_u[b])
            for layer in fixed.layers:
                probe = _drain(network.populations[layer.name], network.period)
                window = probe[depth[layer.name] : depth[layer.name] + steps]
                if layer.kind == "readout":
                    readout[:, b] = np.round(window).astype(np.int64)
                    continue
                counts[layer.name] += window[:, 0]
                if self.record:
                    spikes[layer.name][:, b] = window[:, 1:].reshape((steps, *layer.shape)) != 0
        timed = batch if first or batch == 1 else batch - 1
        self.seconds_per_sample = (time.perf_counter() - started) / timed
        overflows = self._read_overflows(network)
        return Recording(spikes, readout, {k: np.array([v]) for k, v in overflows.items()}, counts)

    def _read_overflows(self, network: _Network) -> dict[str, int]:
        new: dict[str, int] = {}
        for name, pop in network.populations.items():
            total = int(np.asarray(pop.overflow.get()).reshape(-1)[0])
            new[name] = total - network.overflow_seen.get(name, 0)
            network.overflow_seen[name] = total
            self.overflows[name] = self.overflows.get(name, 0) + new[name]
            if new[name] and self.on_overflow == "raise":
                raise overflow_error(name, new[name], " in Lava")
        return new

    def run(self, x: np.ndarray, steps: int) -> SimOutput:
        recording = self.run_recorded(x, steps)
        fixed = self.fixed
        assert fixed is not None
        scale = np.asarray(fixed.layer(fixed.output).scale, np.float64).reshape(-1)
        readout = recording.readout.astype(np.float64) * (scale if scale.size > 1 else scale[0])
        return SimOutput(readout=readout.astype(np.float32), spikes=recording.counts)

    def close(self) -> None:
        """Stop the Lava runtime (a later run builds the network again)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.network = None

    def __enter__(self) -> LavaTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(population: Any, count: int) -> np.ndarray:
    """The `count` messages a population's probe sent during one sample, stacked."""
    port = population.probe.external_pipe_csp_recv_port
    return np.stack([np.array(port.recv(), copy=True) for _ in range(count)])


def _stop(process: Any) -> None:
    try:
        process.stop()
    except Exception:  # the runtime may already be gone at interpreter exit
        pass
