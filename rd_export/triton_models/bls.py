"""Triton Python-backend model: RainDiffusion's DDIM loop over TensorRT plans, through BLS.

Written into ``REPO/<model>/1/model.py`` by ``rd-export triton ARTIFACT.plan``, with ``derain.json``
(the settings: tensor names, channel counts and shape profile from the artifact's descriptor, the
DDIM step tables from ``runtime.schedule``, the seed) beside it. numpy only, so it runs in NVIDIA's
Triton container as it is. What one batch of requests goes through is what ``runtime.Derainer``
does with the same plan (docs/serving.md):

1. frames [n, H, W, 3] uint8 -> y = u8 / 127.5 - 1, [n, 3, H, W] float32; frames of one size from
   all requests of the batch are sampled together, in chunks of the plan's max batch;
2. reflect-pad H, W (bottom / right) up to the size multiple and the profile's minimum;
3. cond = y, or, for a predict-and-refine model, cond = prologue(y) (one call of the prologue plan);
4. x_T = s * N(0, I) from PCG64(seed) (s: the manifest's prologue.noise_scale, 1 where it does not say; 0
   gives x_T = 0), [1, C, Hp, Wp], the same for every frame of that padded size;
5. S fused steps x_t -> x_next, each one BLS call of the step plan (t and coef of step i);
   at zero steps the output is the prologue's estimate, cond[:, estimate_channels]; with a refine
   strength a != 1 (the manifest's prologue.refine_strength) the output is P(y) + a * (x_0 - P(y));
   with a low-pass sigma > 0 (prologue.refine_lowpass), P(y) + a * G_sigma(x_0 - P(y)) of the cropped
   frame (``gaussian_blur``: the runtime's ``runtime.lowpass``, which this file cannot import);
6. crop, round((x + 1) * 127.5) clipped to uint8, [n, H, W, 3].

Frames beyond the plan's profile are refused with the reason (``rd-run serve`` tiles them instead).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

SETTINGS = "derain.json"
_NOISE_CACHE = 4


def pad_reflect(x, height, width):
    """Pad [..., H, W] bottom / right by reflection, in rounds (a 1-pixel side is replicated)."""
    ph, pw = height - x.shape[-2], width - x.shape[-1]
    lead = [(0, 0)] * (x.ndim - 2)
    while ph or pw:
        sh, sw = min(ph, x.shape[-2] - 1), min(pw, x.shape[-1] - 1)
        if sh == 0 and sw == 0:
            return np.pad(x, [*lead, (0, ph), (0, pw)], mode="edge")
        x = np.pad(x, [*lead, (0, sh), (0, sw)], mode="reflect")
        ph, pw = ph - sh, pw - sw
    return x


def gaussian_blur(x, sigma):
    """A Gaussian blur of sigma pixels over the last two axes of float32 [..., H, W] (scipy's mode
    "reflect", truncate 4), as runtime.lowpass computes it: banded matrix products in blocks."""
    r = int(4.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float64) / sigma) ** 2)
    k /= k.sum()
    block = 256
    band = np.zeros((block + 2 * r, block), np.float32)
    for j in range(block):
        band[j:j + 2 * r + 1, j] = k
    for axis in (x.ndim - 1, x.ndim - 2):
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="symmetric")
        out = np.empty_like(x)
        for s in range(0, n, block):
            m = min(block, n - s)
            b = band[:m + 2 * r, :m]
            if axis == x.ndim - 1:
                np.matmul(xp[..., s:s + m + 2 * r], b, out=out[..., s:s + m])
            else:
                np.matmul(b.T, xp[..., s:s + m + 2 * r, :], out=out[..., s:s + m, :])
        x = out
    return x


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(folder, SETTINGS), encoding="utf-8") as f:
            s = json.load(f)
        self.name = args["model_name"]
        self.contract = s["contract"]
        self.step = s["step"]
        self.prologue = s.get("prologue")  # None: the step's condition is the rainy frame itself
        self.seed = int(s["seed"])
        self.max_pixels = int(s["max_pixels"])
        self.multiple = int(s["size_multiple"])
        p = s["profile"]
        self.max_batch = int(p["max_batch"])
        self.min_size, self.max_size = tuple(p["min_size"]), tuple(p["max_size"])
        self.timesteps = np.asarray(s["schedule"]["timesteps"], dtype=np.float32)  # [S], descending
        self.coefficients = np.asarray(s["schedule"]["coefficients"], dtype=np.float32).reshape(-1, 4)  # [S, 4]
        if self.timesteps.shape[0] == 0 and self.prologue is None:
            raise pb_utils.TritonModelException(f"{self.name}: zero steps needs a predict-and-refine model's prologue")
        pro = self.prologue or {}
        self.strength = float(pro.get("refine_strength", 1.0))
        self.lowpass = float(pro.get("refine_lowpass", 0.0)) if self.timesteps.shape[0] else 0.0
        self.memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        self.noise = {}

    # ------------------------------------------------------------------ requests
    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}  # (H, W) -> [(request index, frames)]
        for i, request in enumerate(requests):
            try:
                frames = self._frames(request)
            except ValueError as e:
                responses[i] = self._error(str(e))
                continue
            groups.setdefault(frames.shape[1:3], []).append((i, frames))
        for members in groups.values():
            try:
                out = self._derain(np.concatenate([f for _, f in members]))
            except Exception as e:  # a failed plan call: every request of this size gets the reason
                for i, _ in members:
                    responses[i] = self._error(f"{self.name}: {e}")
                continue
            k = 0
            for i, f in members:
                n = f.shape[0]
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(self.contract["output"], out[k:k + n])])
                k += n
        return responses

    def _error(self, message):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))

    def _frames(self, request):
        name, c = self.contract["input"], int(self.contract["channels"])
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise ValueError(f"input {name!r} is missing")
        x = tensor.as_numpy()
        if x.dtype != np.uint8:
            raise ValueError(f"input {name!r} must be UINT8 (0..255 RGB), got {x.dtype}")
        if x.ndim != 4 or x.shape[-1] != c:
            raise ValueError(f"input {name!r} must have shape [N, H, W, {c}], got {list(x.shape)}")
        n, h, w = x.shape[:3]
        if n < 1 or h < 1 or w < 1:
            raise ValueError(f"input {name!r} is empty: shape {list(x.shape)}")
        if self.max_pixels and h * w > self.max_pixels:
            raise ValueError(f"frame {h}x{w} ({h * w} pixels) is over the server's limit of {self.max_pixels} pixels")
        hp, wp = self._padded(h, w)
        if hp > self.max_size[0] or wp > self.max_size[1]:
            raise ValueError(f"frame {h}x{w} (padded {hp}x{wp}) is beyond the TensorRT plan's profile (at most "
                             f"{self.max_size[0]}x{self.max_size[1]}); rebuild the plan with a larger --max-size, or "
                             f"serve with rd-run serve, which tiles large frames")
        return np.ascontiguousarray(x)

    def _padded(self, h, w):
        m = self.multiple
        return max(-(-h // m) * m, self.min_size[0]), max(-(-w // m) * m, self.min_size[1])

    # ------------------------------------------------------------------ Algorithm 2
    def _derain(self, frames):
        n, h, w, _ = frames.shape
        y = np.ascontiguousarray(np.moveaxis(frames.astype(np.float32) / np.float32(127.5) - np.float32(1.0), -1, 1))
        hp, wp = self._padded(h, w)
        y_p = pad_reflect(y, hp, wp)  # 1-2
        x_0, est = [], []
        for j in range(0, n, self.max_batch):
            chunk = np.ascontiguousarray(y_p[j:j + self.max_batch])
            x, e = self._sample(chunk)
            x_0.append(x)
            est.append(e)
        x_0 = np.concatenate(x_0)[:, :, :h, :w]
        if self.lowpass:  # 5b with the low-pass: P(y) + a * G(x_0 - P(y)) of the cropped frames
            estimate = np.concatenate(est)[:, :, :h, :w]
            x_0 = estimate + np.float32(self.strength) * gaussian_blur(np.ascontiguousarray(x_0 - estimate),
                                                                       self.lowpass)
        u8 = np.clip(np.round((x_0 + np.float32(1.0)) * np.float32(127.5)), 0, 255).astype(np.uint8)  # 6
        return np.ascontiguousarray(np.moveaxis(u8, 1, -1))

    def _sample(self, y_p):
        b, _, hp, wp = y_p.shape
        cond = y_p if self.prologue is None else self._prologue(y_p)  # 3
        if self.timesteps.shape[0] == 0:
            lo, hi = self.prologue["estimate_channels"]
            return np.ascontiguousarray(cond[:, lo:hi]), None
        x_t = np.repeat(self._noise(hp, wp), b, axis=0)  # 4
        for i in range(self.timesteps.shape[0]):  # 5: for i = S, ..., 1
            t = np.full((b,), self.timesteps[i], dtype=np.float32)
            coef = np.ascontiguousarray(np.repeat(self.coefficients[i][None], b, axis=0))
            x_t = self._call(self.step, {self.step["x"]: x_t, self.step["cond"]: cond, self.step["t"]: t,
                                         self.step["coef"]: coef})
        if self.prologue is None:
            return x_t, None
        lo, hi = self.prologue["estimate_channels"]
        estimate = cond[:, lo:hi]
        if self.strength != 1.0 and not self.lowpass:  # 5b: P(y) + a * (x_0 - P(y))
            x_t = estimate + np.float32(self.strength) * (x_t - estimate)
        return x_t, estimate

    def _prologue(self, y_p):
        return self._call(self.prologue, {self.prologue["input"]: y_p})

    def _noise(self, hp, wp):
        key = (hp, wp)
        if key not in self.noise:
            shape = (1, int(self.step["channels"]), hp, wp)
            scale = float(self.prologue.get("noise_scale", 1.0)) if self.prologue is not None else 1.0
            if scale == 0.0:  # x_T = 0, the noise's mean (the manifest's prologue.noise_scale)
                self.noise[key] = np.zeros(shape, np.float32)
            else:
                rng = np.random.Generator(np.random.PCG64(self.seed))
                self.noise[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            while len(self.noise) > _NOISE_CACHE:
                self.noise.pop(next(iter(self.noise)))
        return self.noise[key]

    def _call(self, graph, inputs):
        """One BLS call of a plan model; its output back in host memory."""
        request = pb_utils.InferenceRequest(
            model_name=graph["model"], requested_output_names=[graph["output"]],
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
            preferred_memory=self.memory)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{graph['model']}: {response.error().message()}")
        out = pb_utils.get_output_tensor_by_name(response, graph["output"])
        if out is None:
            raise RuntimeError(f"{graph['model']} returned no {graph['output']!r}")
        return out.as_numpy()
