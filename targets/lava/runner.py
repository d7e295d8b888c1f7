"""Lower the fixed-point network to Lava processes and run it with `Loihi2SimCfg(select_tag='fixed_pt')`.

Network: a `RingBuffer` (one frame, repeated every step) sends the graded input spikes
(`toolchain.quantize.encode_input`); each layer is one connection process plus one of our
populations (`targets.lava.process`): `Dense` for dense synapses, `Sparse` for
convolutions (built with `lava.proc.conv.utils.conv_to_sparse` in PyTorch's NCHW order, so
no kernel flipping or (X, Y, C) transposition is needed on our side), with a preceding
sum-pool folded into the matrix (each entry is still one 8-bit mantissa, as pools do not
overlap). Weights are passed as `2*q` with `weight_exp = weight_exp - 1`: Lava's fixed-point
Dense/Sparse clip to [-256, 255] and clear the lowest bit of mixed-sign weights, both of
which leave `2*q` (|q| <= 127) intact, and the shift by `weight_exp - 1` gives exactly the
emulator's `sum(q*s) << weight_exp` (or its floor, for negative exponents).

Timing: each connection adds one step of delay, so the layer at depth d sees at Lava step
t the input of step t - d. The network is built once per number of steps T and streams
samples one after the other: for each sample the input frame is set and the network runs
P = T + D steps (D the readout's depth); every population resets itself to v0 at phase
`d` of each period of P steps, i.e. exactly when the new sample's input reaches it.
Phase d + k of layer d is logical step k (`targets.loihi.emulator` works in logical time),
so the readout at logical step T-1 reflects exactly T steps of input.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import targets.lava  # noqa: F401  (fails with a clear ToolchainError when Lava is missing)
from targets.base import SimOutput
from targets.loihi.emulator import QUANTIZE_OPTIONS, LoihiTarget, Recording
from toolchain import ir
from toolchain.errors import ToolchainError
from toolchain.quantize import FixedGraph, FixedLayer, as_fixed, encode_input

TAGS = ("fixed_pt", "floating_pt")


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


def connection_matrix(layer: FixedLayer) -> Any:
    """The layer's integer synapse as a scipy CSR matrix (out, in) over CHW-flattened vectors."""
    from lava.proc.conv.utils import conv_to_sparse
    from scipy.sparse import csr_matrix

    pooled = layer.pooled_shape
    n_in = int(np.prod(pooled))
    if layer.synapse == "conv":
        # Lava's own order (its NCHW branch is broken in 0.10.0): a true convolution with kernels
        # (C_out, kW, kH, C_in) on (X, Y, C) tensors. Our kernels are PyTorch correlations
        # (C_out, C_in, kH, kW) on (C, H, W), so flip both spatial axes and transpose.
        kernel = layer.weight.astype(np.int64)[:, :, ::-1, ::-1].transpose(0, 3, 2, 1)
        c_in, h_in, w_in = pooled
        c_out, h_out, w_out = layer.shape
        dst, src, wgt = conv_to_sparse(
            (w_in, h_in, c_in),
            (w_out, h_out, c_out),
            np.ascontiguousarray(kernel),
            (layer.stride[1], layer.stride[0]),
            (layer.padding[1], layer.padding[0]),  # asymmetric padding: the output shape fixes right/bottom
            (layer.dilation[1], layer.dilation[0]),
            layer.groups,
        )
        # (X, Y, C)-flattened indices -> our (C, H, W)-flattened ones
        src = np.arange(n_in).reshape(c_in, h_in, w_in).transpose(2, 1, 0).reshape(-1)[src]
        dst = np.arange(layer.size).reshape(c_out, h_out, w_out).transpose(2, 1, 0).reshape(-1)[dst]
        matrix = csr_matrix((wgt.astype(np.int64), (dst, src)), shape=(layer.size, n_in))
    else:
        matrix = csr_matrix(layer.weight.astype(np.int64).reshape(layer.size, n_in))
    if layer.pool != (1, 1):
        matrix = (matrix @ _pool_matrix(tuple(layer.in_shape), layer.pool)).tocsr()
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
    """Implements `targets.base.Target` on the Lava CPU simulator.

    Options: `fixed` (a pre-quantised FixedGraph), `tag` ("fixed_pt", default, bit-exact with the
    emulator; or "floating_pt": the same network in float64 models), `record` (keep every IF layer's
    spikes per step per neuron, for `run_recorded`), `on_overflow` ("raise" or "saturate"), `fast_sparse`
    (default True: Sparse connections receive binary spikes as 1-bit graded payloads, same sums, faster
    CSR products), and the keyword
    arguments of `toolchain.quantize.quantize`. Call `close()` (or use it as a context manager) to stop the
    Lava runtime.
    """

    name = "lava"

    def __init__(
        self,
        fixed: FixedGraph | None = None,
        tag: str = "fixed_pt",
        record: bool = False,
        on_overflow: str = "raise",
        fast_sparse: bool = True,
        **options: object,
    ):
        if tag not in TAGS:
            raise ToolchainError(f"tag={tag!r}: choose one of {', '.join(TAGS)}")
        if on_overflow not in ("raise", "saturate"):
            raise ToolchainError(f"on_overflow={on_overflow!r}: choose raise or saturate")
        self.fixed_option = fixed
        self.fixed = fixed
        self.tag = tag
        self.record = record
        self.on_overflow = on_overflow
        self.fast_sparse = fast_sparse
        self.startup_seconds: float | None = None
        self.quantize_options = {k: v for k, v in options.items() if k in QUANTIZE_OPTIONS and v is not None}
        self.network: _Network | None = None
        self.overflows: dict[str, int] = {}
        self.seconds_per_sample: float | None = None
        self.build_seconds: float | None = None
        self._finalizer: Any = None

    # ----------------------------------------------------------------- build

    def prepare(self, graph: ir.Graph | FixedGraph) -> None:
        self.fixed = as_fixed(graph, self.fixed_option, self.quantize_options)
        self.close()
        self.overflows = {layer.name: 0 for layer in self.fixed.layers}

    def _build(self, steps: int) -> _Network:
        from lava.proc.dense.process import Dense
        from lava.proc.io.source import RingBuffer
        from lava.proc.sparse.process import Sparse

        from targets.lava.process.process import Accumulator, IFReset

        fixed = self.fixed
        assert fixed is not None, "prepare() first"
        started = time.perf_counter()
        depth = fixed.depth
        period = steps + depth[fixed.output]
        fixed_pt = self.tag == "fixed_pt"
        n_in = int(np.prod(fixed.input_shape))
        ring = RingBuffer(data=np.zeros((n_in, 1), np.int32 if fixed_pt else np.float64))
        populations: dict[str | None, Any] = {None: ring}
        connections: dict[str, Any] = {}
        readout = None
        for layer in fixed.layers:
            matrix = connection_matrix(layer)
            graded = layer.source is None
            # Binary spikes as 1-bit graded payloads (0/1) give the same sums, but Lava's Sparse then
            # takes a CSR mat-vec instead of slicing columns, which is ~10x faster.
            binary_bits = 1 if (self.fast_sparse and layer.synapse != "dense") else 0
            conn_options: dict[str, Any] = {
                "num_message_bits": fixed.input_bits if graded else binary_bits,
                "name": f"{layer.name}/synapse",
            }
            if fixed_pt:
                matrix = matrix * 2
                conn_options["weight_exp"] = layer.weight_exp - 1
            else:
                matrix = matrix.astype(np.float64) * 2.0**layer.weight_exp
            if layer.synapse == "dense":
                conn = Dense(weights=matrix.toarray(), **conn_options)
            else:
                conn = Sparse(weights=matrix, **conn_options)
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
            populations[layer.source].s_out.connect(conn.s_in)
            conn.a_out.connect(pop.a_in)
            populations[layer.name] = pop
            connections[layer.name] = conn
        assert readout is not None
        network = _Network(steps, period, ring, {k: v for k, v in populations.items() if k}, connections, readout)
        self.build_seconds = time.perf_counter() - started
        return network

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
                raise ToolchainError(
                    f"layer {name!r}: the 24-bit membrane overflowed {new[name]} times in Lava; quantise with "
                    "a lower threshold_bits (quantize()), fewer steps (-T), or pass on_overflow='saturate'"
                )
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


def make_target(**options: object) -> LavaTarget:
    return LavaTarget(**options)  # type: ignore[arg-type]


# ------------------------------------------------------------------ validation


@dataclass
class ValidationReport:
    samples: int
    steps: int
    layers: list[str]
    mismatch: dict[str, Any] | None  # first difference: layer, sample, step (logical), neuron, lava, emulator
    readout_equal: bool
    overflows_lava: dict[str, int]
    overflows_emulator: dict[str, int]
    lava_seconds_per_sample: float
    lava_build_seconds: float
    lava_startup_seconds: float  # wall time of the first sample: compiling, starting the runtime, running it
    emulator_seconds: float
    spikes_compared: int

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok, "summary": self.summary()}

    @property
    def ok(self) -> bool:
        return self.mismatch is None and self.readout_equal

    def summary(self) -> str:
        if self.ok:
            return (
                f"lava == emulator: {self.spikes_compared} spike slots in {len(self.layers)} layers, "
                f"{self.samples} samples x {self.steps} steps, identical; readout identical"
            )
        if self.mismatch is None:
            return "spikes identical but the readout accumulators differ"
        m = self.mismatch
        return (
            f"first difference in layer {m['layer']!r}, sample {m['sample']}, step {m['step']}, neuron {m['neuron']}: "
            f"lava {m['lava']} vs emulator {m['emulator']}"
        )


def validate(graph: ir.Graph | FixedGraph, x_batch: np.ndarray, steps: int, **options: object) -> ValidationReport:
    """Run the samples through Lava (fixed_pt) and the emulator; compare every IF layer's spikes at
    every step and the readout accumulators. `options` go to `quantize` (when `graph` is a float SNN)."""
    fixed = as_fixed(graph, None, options)
    emulator = LoihiTarget(device="cpu", fixed=fixed, on_overflow="saturate")
    emulator.prepare(fixed)
    started = time.perf_counter()
    expected = emulator.record(x_batch, steps)
    emulator_seconds = time.perf_counter() - started
    lava = LavaTarget(fixed=fixed, record=True, on_overflow="saturate")
    lava.prepare(fixed)
    try:
        got = lava.run_recorded(x_batch, steps)
    finally:
        lava.close()
    order = [layer.name for layer in fixed.if_layers]
    mismatch = first_mismatch(order, got.spikes, expected.spikes)
    return ValidationReport(
        samples=len(x_batch),
        steps=steps,
        layers=order,
        mismatch=mismatch,
        readout_equal=bool(np.array_equal(got.readout, expected.readout)),
        overflows_lava={k: int(v.sum()) for k, v in got.overflows.items()},
        overflows_emulator={k: int(v.sum()) for k, v in expected.overflows.items()},
        lava_seconds_per_sample=float(lava.seconds_per_sample or 0.0),
        lava_build_seconds=float(lava.build_seconds or 0.0),
        lava_startup_seconds=float(lava.startup_seconds or 0.0),
        emulator_seconds=emulator_seconds,
        spikes_compared=int(sum(v.size for v in expected.spikes.values())),
    )


def first_mismatch(order: list[str], got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Earliest (sample, step) first, then the layer order, then the neuron index."""
    best: tuple[int, int, int, int] | None = None
    for index, name in enumerate(order):
        a = got[name].reshape(got[name].shape[0], got[name].shape[1], -1)
        b = expected[name].reshape(a.shape)
        diff = np.argwhere(a != b)  # (step, sample, neuron)
        if len(diff):
            step, sample, neuron = (int(v) for v in diff[np.lexsort((diff[:, 2], diff[:, 0], diff[:, 1]))[0]])
            key = (sample, step, index, neuron)
            best = key if best is None or key < best else best
    if best is None:
        return None
    sample, step, index, neuron = best
    name = order[index]
    return {
        "layer": name,
        "sample": sample,
        "step": step,
        "neuron": neuron,
        "lava": int(got[name].reshape(got[name].shape[0], got[name].shape[1], -1)[step, sample, neuron]),
        "emulator": int(expected[name].reshape(expected[name].shape[0], expected[name].shape[1], -1)[step, sample, neuron]),
    }
