"""ProcessModels of `IFReset` and `Accumulator`: `fixed_pt` (integers, bit-exact with
`targets.loihi.emulator`) and `floating_pt` (the same rules in float64).

The neuron update is written out here again on purpose: Lava runs these models, and
`toolchain.validate` compares them spike for spike with the emulator, an independent
implementation of the arithmetic in `toolchain.core.fixed`. Only the format's constants
are shared."""

from __future__ import annotations

import numpy as np
from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol

from targets.lava.process.process import Accumulator, IFReset
from toolchain.core.fixed import V_MAX  # 24-bit signed membrane, saturating like Lava's LIF


def _in_window(phase: int, offset: np.ndarray, window: np.ndarray) -> bool:
    return int(offset[0]) <= phase < int(offset[0]) + int(window[0])


class _IFBase(PyLoihiProcessModel):
    PROBE_DTYPE: type = np.int32

    def _phase(self) -> int:
        return (self.time_step - 1) % int(self.period[0])

    def _step(self, a_in: np.ndarray, bias: np.ndarray) -> np.ndarray:
        phase = self._phase()
        if phase == int(self.offset[0]):
            self.v[:] = self.v0
        v = self.v + a_in + bias
        over = (v > V_MAX) | (v < -V_MAX)
        if over.any():
            if _in_window(phase, self.offset, self.window):
                self.overflow[0] += int(over.sum())
            v = np.clip(v, -V_MAX, V_MAX)
        spikes = v >= self.vth[0]
        v = v - spikes * self.vth[0]
        self.v[:] = v
        probe = np.empty(self.probe.shape, self.PROBE_DTYPE)
        probe[0] = spikes.sum()
        if probe.size > 1:
            probe[1:] = spikes.reshape(-1)
        self.probe.send(probe)
        return spikes


@implements(proc=IFReset, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyIFResetFixed(_IFBase):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=1)
    v: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=24)
    v0: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=24)
    vth: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=24)
    bias_mant: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=13)
    bias_exp: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=3)
    period: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=32)
    offset: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=32)
    window: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=32)
    overflow: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=32)
    probe: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=32)

    def run_spk(self) -> None:
        a_in = self.a_in.recv().astype(np.int64)
        bias = np.left_shift(self.bias_mant, int(self.bias_exp[0]))
        spikes = self._step(a_in, bias)
        self.s_out.send(spikes.astype(np.int32))


@implements(proc=IFReset, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PyIFResetFloat(_IFBase):
    PROBE_DTYPE = np.float64
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    v: np.ndarray = LavaPyType(np.ndarray, float)
    v0: np.ndarray = LavaPyType(np.ndarray, float)
    vth: np.ndarray = LavaPyType(np.ndarray, float)
    bias_mant: np.ndarray = LavaPyType(np.ndarray, float)
    bias_exp: np.ndarray = LavaPyType(np.ndarray, float)
    period: np.ndarray = LavaPyType(np.ndarray, int)
    offset: np.ndarray = LavaPyType(np.ndarray, int)
    window: np.ndarray = LavaPyType(np.ndarray, int)
    overflow: np.ndarray = LavaPyType(np.ndarray, int)
    probe: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=32)

    def run_spk(self) -> None:
        a_in = self.a_in.recv().astype(np.float64)
        spikes = self._step(a_in, self.bias_mant * 2.0 ** self.bias_exp[0])
        self.s_out.send(spikes.astype(np.float64))


class _AccumulatorBase(PyLoihiProcessModel):
    PROBE_DTYPE: type = np.int32

    def _step(self, a_in: np.ndarray, bias: np.ndarray) -> None:
        phase = (self.time_step - 1) % int(self.period[0])
        if phase == int(self.offset[0]):
            self.acc[:] = 0
        acc = self.acc + a_in + bias
        over = (acc > V_MAX) | (acc < -V_MAX)
        if over.any():
            if _in_window(phase, self.offset, self.window):
                self.overflow[0] += int(over.sum())
            acc = np.clip(acc, -V_MAX, V_MAX)
        self.acc[:] = acc
        self.probe.send(acc.astype(self.PROBE_DTYPE))


@implements(proc=Accumulator, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyAccumulatorFixed(_AccumulatorBase):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)
    acc: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=24)
    bias_mant: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=13)
    bias_exp: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=3)
    period: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=32)
    offset: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=32)
    window: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=32)
    overflow: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=32)
    probe: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)

    def run_spk(self) -> None:
        a_in = self.a_in.recv().astype(np.int64)
        self._step(a_in, np.left_shift(self.bias_mant, int(self.bias_exp[0])))


@implements(proc=Accumulator, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PyAccumulatorFloat(_AccumulatorBase):
    PROBE_DTYPE = np.float64
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    acc: np.ndarray = LavaPyType(np.ndarray, float)
    bias_mant: np.ndarray = LavaPyType(np.ndarray, float)
    bias_exp: np.ndarray = LavaPyType(np.ndarray, float)
    period: np.ndarray = LavaPyType(np.ndarray, int)
    offset: np.ndarray = LavaPyType(np.ndarray, int)
    window: np.ndarray = LavaPyType(np.ndarray, int)
    overflow: np.ndarray = LavaPyType(np.ndarray, int)
    probe: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)

    def run_spk(self) -> None:
        a_in = self.a_in.recv().astype(np.float64)
        self._step(a_in, self.bias_mant * 2.0 ** self.bias_exp[0])
