"""The I/O contract of the exported fused DDIM step (docs/ARCHITECTURE.md, code convention 4).

One object owns the tensor names, dtypes, dynamic axes, the size multiple and the
min/opt/max shape profile. The ONNX exporter, the TensorRT builder and the runtime
backends all read it; nobody re-types a tensor name.

The fused step computes one eta = 0 DDIM update of Algorithm 2::

    inputs   x_t  [N, 3, H, W] float32   current sample
             cond [N, 3, H, W] float32   rainy image (derain model) in [-1, 1]
             t    [N]          float32   the 1-based timestep tau_i, as a float
             coef [N, 4]       float32   (a, b, c, d) of runtime.schedule for tau_i -> tau_{i-1}
    output   x_next [N, 3, H, W] float32

    eps_hat = estimator(x_t, cond, t)
    x_next  = c * (a * x_t - b * eps_hat) + d * eps_hat
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["TensorSpec", "ShapeProfile", "StepDescriptor"]


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

    def shapes(self, channels: int = 3) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shape per input tensor name of the fused step."""
        def img(b: int, hw: tuple[int, int]) -> tuple[int, ...]:
            return (b, channels, hw[0], hw[1])

        out = {}
        for name in ("x_t", "cond"):
            out[name] = (img(self.min_batch, self.min_size), img(self.opt_batch, self.opt_size),
                         img(self.max_batch, self.max_size))
        out["t"] = ((self.min_batch,), (self.opt_batch,), (self.max_batch,))
        out["coef"] = ((self.min_batch, 4), (self.opt_batch, 4), (self.max_batch, 4))
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


@dataclass(frozen=True)
class StepDescriptor:
    """The fused DDIM step's I/O contract."""

    size_multiple: int
    channels: int = 3
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    opset: int = 17

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
            TensorSpec(self.COND, "float32", ("batch", c, "height", "width")),
            TensorSpec(self.T, "float32", ("batch",)),
            TensorSpec(self.COEF, "float32", ("batch", 4)),
        )

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(self.OUT, "float32", ("batch", self.channels, "height", "width")),)

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
            "opset": self.opset,
            "profile": self.profile.to_dict(),
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.inputs],
            "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> StepDescriptor:
        return cls(size_multiple=int(d["size_multiple"]), channels=int(d.get("channels", 3)),
                   profile=ShapeProfile.from_dict(d["profile"]), opset=int(d.get("opset", 17)))
