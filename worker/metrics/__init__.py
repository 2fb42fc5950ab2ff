"""Prometheus metrics of the worker (its own names never contain "vllm"; engine metrics keep theirs)."""

from worker.metrics.billing import BillingCollector
from worker.metrics.capacity import CapacityCollector
from worker.metrics.economics import EconomicsCollector
from worker.metrics.engines import EngineMetricsCollector
from worker.metrics.gateway import GatewayMetrics
from worker.metrics.gateway_processes import GatewayProcessCollector
from worker.metrics.replicas import ReplicaCollector

__all__ = ["BillingCollector", "CapacityCollector", "EconomicsCollector", "EngineMetricsCollector",
           "GatewayMetrics", "GatewayProcessCollector", "ReplicaCollector"]
