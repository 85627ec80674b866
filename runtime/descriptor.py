"""The I/O contract of the exported fused DDIM step (docs/ARCHITECTURE.md, code convention 4).

One object owns the tensor names, dtypes, dynamic axes, the size multiple and the
min/opt/max shape profile. The ONNX exporter, the TensorRT builder and the runtime
backends all read it; nobody re-types a tensor name.

The fused step computes one eta = 0 DDIM update of Algorithm 2::

    inputs   x_t  [N, 3, H, W] float32   current sample
             cond [N, C, H, W] float32   the condition in [-1, 1]: the rainy image y (C = 3, the
                                         paper) or [y, P(y)] from the prologue (C = 6)
             t    [N]          float32   the 1-based timestep tau_i, as a float
             coef [N, 4]       float32   (a, b, c, d) of runtime.schedule for tau_i -> tau_{i-1}
    output   x_next [N, 3, H, W] float32

    eps_hat = estimator(x_t, cond, t)
    x_next  = c * (a * x_t - b * eps_hat) + d * eps_hat

A predict-and-refine model adds a **prologue** graph, run once per frame before the steps::

    input    rainy [N, 3, H, W] float32   the rainy frame y in [-1, 1]
    output   cond  [N, 6, H, W] float32   [y, P(y)]: the step's condition (P(y) is the output at 0 steps)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["TensorSpec", "ShapeProfile", "StepDescriptor", "PrologueDescriptor"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]  # symbolic names are dynamic axes


@dataclass(frozen=True)
class ShapeProfile:
    """Optimisation profile for engines: batch and square-ish spatial bounds (pixels)."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    min_size: tuple[int, int] = (64, 64)
    opt_size: tuple[int, int] = (256, 256)
    max_size: tuple[int, int] = (1024, 1024)

    def validate(self, multiple: int) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        for axis, name in ((0, "height"), (1, "width")):
            lo, opt, hi = self.min_size[axis], self.opt_size[axis], self.max_size[axis]
            if not 0 < lo <= opt <= hi:
                raise ValueError(f"{name} profile must satisfy 0 < min <= opt <= max, got {lo}/{opt}/{hi}")
            for v in (lo, opt, hi):
                if v % multiple:
                    raise ValueError(f"{name} {v} in the shape profile is not a multiple of {multiple}")

    def points(self) -> dict[str, tuple[int, int, int]]:
        """(batch, height, width) of the profile's min, opt and max shapes."""
        return {"min": (self.min_batch, *self.min_size), "opt": (self.opt_batch, *self.opt_size),
                "max": (self.max_batch, *self.max_size)}

    def shapes(self, inputs: tuple[TensorSpec, ...]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """min/opt/max concrete shape per input tensor of ``inputs`` (a descriptor's ``inputs``):
        the symbolic axes ``batch``, ``height``, ``width`` take the profile's values."""
        out = {}
        for spec in inputs:
            rows = []
            for b, h, w in self.points().values():
                axes = {"batch": b, "height": h, "width": w}
                rows.append(tuple(axes[d] if isinstance(d, str) else int(d) for d in spec.shape))
            out[spec.name] = tuple(rows)
        return out

    def fits(self, batch: int, height: int, width: int) -> bool:
        return (self.min_batch <= batch <= self.max_batch
                and self.min_size[0] <= height <= self.max_size[0]
                and self.min_size[1] <= width <= self.max_size[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["min_size"], d["opt_size"], d["max_size"] = (list(self.min_size), list(self.opt_size),
                                                       list(self.max_size))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ShapeProfile:
        return cls(min_batch=int(d["min_batch"]), opt_batch=int(d["opt_batch"]), max_batch=int(d["max_batch"]),
                   min_size=tuple(int(v) for v in d["min_size"]), opt_size=tuple(int(v) for v in d["opt_size"]),
                   max_size=tuple(int(v) for v in d["max_size"]))


class _GraphIO:
    """What every graph's contract derives from its ``inputs`` / ``outputs`` TensorSpecs."""

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's ``dynamic_axes`` argument."""
        axes: dict[str, dict[int, str]] = {}
        for spec in self.inputs + self.outputs:
            axes[spec.name] = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
        return axes

    def input_shapes(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """min/opt/max shape of every input (what an engine's optimisation profile is given)."""
        return self.profile.shapes(self.inputs)


@dataclass(frozen=True)
class StepDescriptor(_GraphIO):
    """The fused DDIM step's I/O contract."""

    size_multiple: int
    channels: int = 3
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    opset: int = 17
    #: channels of ``cond``: 3 (the rainy image) or 6 (the prologue's [y, P(y)])
    cond_channels: int = 3

    X = "x_t"
    COND = "cond"
    T = "t"
    COEF = "coef"
    OUT = "x_next"

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        c = self.channels
        return (
            TensorSpec(self.X, "float32", ("batch", c, "height", "width")),
            TensorSpec(self.COND, "float32", ("batch", self.cond_channels, "height", "width")),
            TensorSpec(self.T, "float32", ("batch",)),
            TensorSpec(self.COEF, "float32", ("batch", 4)),
        )

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(self.OUT, "float32", ("batch", self.channels, "height", "width")),)

    def check_frame_size(self, height: int, width: int) -> None:
        """Raise ValueError naming the sizes and the multiple when H or W does not fit."""
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the model's size multiple {m}; "
                f"pad to {-(-height // m) * m}x{-(-width // m) * m}"
            )

    def to_dict(self) -> dict:
        return {
            "size_multiple": self.size_multiple,
            "channels": self.channels,
            "cond_channels": self.cond_channels,
            "opset": self.opset,
            "profile": self.profile.to_dict(),
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.inputs],
            "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> StepDescriptor:
        return cls(size_multiple=int(d["size_multiple"]), channels=int(d.get("channels", 3)),
                   profile=ShapeProfile.from_dict(d["profile"]), opset=int(d.get("opset", 17)),
                   cond_channels=int(d.get("cond_channels", 3)))

    def prologue(self) -> PrologueDescriptor:
        """The I/O contract of this step's prologue (predict-and-refine models only)."""
        if self.cond_channels == self.channels:
            raise ValueError("this step takes the rainy image itself as its condition: it has no prologue")
        return PrologueDescriptor(size_multiple=self.size_multiple, channels=self.channels, profile=self.profile,
                                  opset=self.opset, cond_channels=self.cond_channels)


@dataclass(frozen=True)
class PrologueDescriptor(_GraphIO):
    """The prologue graph's I/O contract: rainy y -> cond = [y, P(y)] (see the module docstring).

    Same size multiple and shape profile as its step; its output is the step's ``cond`` input,
    so the runtime binds one buffer to both.
    """

    size_multiple: int
    channels: int = 3
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    opset: int = 17
    cond_channels: int = 6

    RAINY = "rainy"
    OUT = StepDescriptor.COND

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(self.RAINY, "float32", ("batch", self.channels, "height", "width")),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(self.OUT, "float32", ("batch", self.cond_channels, "height", "width")),)

    @property
    def estimate_channels(self) -> slice:
        """Where P(y) sits in ``cond`` (the output at zero DDIM steps): its last three channels."""
        return slice(self.cond_channels - 3, self.cond_channels)
