"""The whole run's wall time and cost from the measured step (prices from prices.yaml)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from raytrain_at.config_loader import FileKind
from raytrain_at.errors import UserError

# The bundled instance prices (raytrain_at/preflight/prices.yaml), read by the project's one
# YAML loader.
PRICES = FileKind(noun="price table", folder="preflight",
                  listing=lambda names: f"bundled: {', '.join(names)}")


@lru_cache(maxsize=1)
def price_table() -> dict[str, Any]:
    """The price table (``taken``: the date the prices were read)."""
    return PRICES.read("prices")[0]


@dataclass(frozen=True)
class Estimate:
    steps_per_epoch: int
    epochs: int
    wall_s: float
    instance: str
    instances: int
    on_demand_usd: float
    spot_usd: float
    prices_taken: str

    def figure(self) -> str:
        hours = self.wall_s / 3600
        return (f"{self.epochs} ep x {self.steps_per_epoch} steps = {hours:.2f} h; "
                f"{self.instances} x {self.instance}: ${self.on_demand_usd:,.2f} on-demand, "
                f"${self.spot_usd:,.2f} spot (prices of {self.prices_taken})")


def check_instance(instance: str) -> None:
    """Refuse an instance type the estimate cannot price.

    Raises:
        UserError: an instance type the price table does not list.
    """
    table = price_table()["instances"]
    if instance not in table:
        raise UserError(f"--instance {instance!r} is not in the price table "
                        f"({', '.join(sorted(table))}; raytrain_at/preflight/prices.yaml)")


def estimate_run(*, samples: int, global_batch: int, epochs: int, step_s: float,
                 instance: str, instances: int = 1) -> Estimate:
    """Wall time = epochs x steps per epoch x the measured step (workers step together, so the
    slowest worker's median is the step), cost = wall hours x instances x the hourly price.

    Raises:
        UserError: an instance type the price table does not list.
    """
    check_instance(instance)
    table = price_table()["instances"]
    steps = max(1, samples // global_batch)  # the loader drops the last partial batch
    wall = epochs * steps * step_s
    hours = wall / 3600 * instances
    price = table[instance]
    return Estimate(steps, epochs, wall, instance, instances,
                    round(hours * float(price["on_demand"]), 2),
                    round(hours * float(price["spot"]), 2), str(price_table()["taken"]))


def instances_needed(workers: int, gpus_per_instance: int) -> int:
    return max(1, math.ceil(workers / max(1, gpus_per_instance)))
