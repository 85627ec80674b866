"""RainDiffusion runtime: numpy plus one inference engine, never torch."""

from runtime.errors import RDError
from runtime.schedule import DDIMSchedule, ScheduleConfig, initial_noise

__version__ = "0.1.0"

__all__ = ["DDIMSchedule", "ScheduleConfig", "initial_noise", "RDError", "__version__"]
