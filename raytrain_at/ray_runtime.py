"""Starting (or joining) Ray the same way for every command that uses it."""

from __future__ import annotations


def init_ray(address: str | None = None, *, dashboard: bool = False) -> None:
    """Join the cluster at ``address`` (``auto`` on a node of it), or start Ray on this machine.

    Args:
        address: a Ray address, or None to start a local instance.
        dashboard: start the local instance with its dashboard, bound to 127.0.0.1. Tune studies
            need it: Ray Train's placement-group cleaner asks the dashboard's State API whether a
            run's controller is alive, and a trial that Tune stops (ASHA) dies without freeing
            its workers' placement group otherwise, so the next trial waits for ever. Without
            it, Ray's workers run :func:`raytrain_at.training.launch.quiet_ray_internals` to
            silence the cleaner's warnings.
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             log_to_driver=True,
             ignore_reinit_error=True,
             runtime_env={"worker_process_setup_hook":
                          "raytrain_at.training.launch.quiet_ray_internals"})
