"""Integrate-and-fire with reset by subtraction, and a non-spiking readout accumulator.

Both reset their state to `v0` once every `period` steps, at step `offset` of the period
(Lava counts steps from 1; the reset happens when (time_step - 1) % period == offset), so a
feed-forward network can stream samples back to back: a layer at depth d resets exactly
when the first input of the new sample reaches it. Overflows are counted only in the
`window` steps from `offset` on (the steps that belong to the sample); before them the
layer is still integrating the tail of the previous sample, which is discarded.
"""

from __future__ import annotations

import numpy as np
from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.process.variable import Var


class IFReset(AbstractProcess):
    """Integrate-and-fire population, reset by subtraction, 24-bit membrane.

    Each step: v += a_in + (bias_mant << bias_exp); v saturates at +-(2**23 - 1) and every
    saturation is counted in `overflow`; s = v >= vth; v -= s * vth; s is sent.

    `probe` is an OutPort flagged as an external pipe (read from the host with
    `probe.external_pipe_csp_recv_port.recv()`, `probe_buffer` messages at most before it
    blocks): each step it carries the number of spikes, followed by the spike vector when
    `record` is set. (Var.get in Lava 0.10 moves arrays one element per message, far too slow.)
    """

    def __init__(
        self,
        *,
        shape: tuple[int, ...],
        vth: int,
        v0: np.ndarray | int = 0,
        bias_mant: np.ndarray | int = 0,
        bias_exp: int = 0,
        period: int = 1,
        offset: int = 0,
        window: int | None = None,
        record: bool = False,
        probe_buffer: int = 64,
        name: str | None = None,
    ) -> None:
        super().__init__(shape=shape, name=name)
        size = int(np.prod(shape))
        self.a_in = InPort(shape=shape)
        self.s_out = OutPort(shape=shape)
        self.v = Var(shape=shape, init=v0)
        self.v0 = Var(shape=shape, init=v0)
        self.vth = Var(shape=(1,), init=vth)
        self.bias_mant = Var(shape=shape, init=bias_mant)
        self.bias_exp = Var(shape=(1,), init=bias_exp)
        self.period = Var(shape=(1,), init=period)
        self.offset = Var(shape=(1,), init=offset)
        self.window = Var(shape=(1,), init=period if window is None else window)
        self.overflow = Var(shape=(1,), init=0)
        self.probe = OutPort(shape=(1 + size if record else 1,))
        self.probe.flag_external_pipe(buffer_size=probe_buffer)


class Accumulator(AbstractProcess):
    """Non-spiking readout: acc += a_in + (bias_mant << bias_exp), 24-bit, saturating (counted).

    `probe` (an external-pipe OutPort, see `IFReset`) carries the accumulator after each step.
    """

    def __init__(
        self,
        *,
        shape: tuple[int, ...],
        bias_mant: np.ndarray | int = 0,
        bias_exp: int = 0,
        period: int = 1,
        offset: int = 0,
        window: int | None = None,
        probe_buffer: int = 64,
        name: str | None = None,
    ) -> None:
        super().__init__(shape=shape, name=name)
        self.a_in = InPort(shape=shape)
        self.acc = Var(shape=shape, init=0)
        self.bias_mant = Var(shape=shape, init=bias_mant)
        self.bias_exp = Var(shape=(1,), init=bias_exp)
        self.period = Var(shape=(1,), init=period)
        self.offset = Var(shape=(1,), init=offset)
        self.window = Var(shape=(1,), init=period if window is None else window)
        self.overflow = Var(shape=(1,), init=0)
        self.probe = OutPort(shape=shape)
        self.probe.flag_external_pipe(buffer_size=probe_buffer)
