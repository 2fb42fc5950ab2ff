"""Capacity: engine load and health signals, admission control, readiness and draining (its HTTP routes: worker/api)."""

from worker.capacity.admission import Admission
from worker.capacity.document import CapacityDocument, CapacityState
from worker.capacity.limits import AdmissionLimits
from worker.capacity.load import EngineLoad
from worker.capacity.monitor import CapacityMonitor
from worker.capacity.stats import EngineStats

__all__ = [
    "Admission",
    "AdmissionLimits",
    "CapacityDocument",
    "CapacityMonitor",
    "CapacityState",
    "EngineLoad",
    "EngineStats",
]
