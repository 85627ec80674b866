"""RainDiffusion runtime: numpy plus one inference engine, never torch."""

from runtime.errors import RDError
from runtime.schedule import DDIMSchedule, ScheduleConfig, initial_noise

__version__ = "0.1.0"

__all__ = ["DDIMSchedule", "Derainer", "ScheduleConfig", "initial_noise", "RDError", "__version__"]


def __getattr__(name: str):
    # Lazy: `import runtime` stays numpy-only; `runtime.Derainer` imports the derainer on first use.
    if name == "Derainer":
        from runtime.derainer import Derainer

        return Derainer
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
