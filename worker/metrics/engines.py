"""Every replica's own engine metrics, re-exported under their engine names with `model` and `replica` labels.

One scrape of the worker then shows the engines too. The text is each replica's whole /metrics page,
fetched when the node's /metrics is read (admission's own scrapes ask only for the samples it needs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

logger = logging.getLogger(__name__)

ENGINE_PREFIX = "vllm:"  # the engine's process/gc metrics stay out: they would clash across replicas

# (model id, replica id, the engine's /metrics text)
ScrapeSource = Callable[[], Iterable[tuple[str, str, str]]]


class EngineMetricsCollector:
    def __init__(self, scrapes: ScrapeSource) -> None:
        self.scrapes = scrapes

    def describe(self) -> list[Metric]:
        return []  # families depend on the engines; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for model, replica, text in self.scrapes():
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError:
                logger.warning("engine metrics unparsable", extra={"replica": replica})
                continue
            for family in families:
                if not family.name.startswith(ENGINE_PREFIX):
                    continue
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                elif target.type != family.type:
                    continue  # replicas on different engine versions: keep the first kind
                for sample in family.samples:
                    labels = {**sample.labels, "model": model, "replica": replica}
                    target.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp,
                                                 sample.exemplar))
        yield from merged.values()
