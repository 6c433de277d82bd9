"""Starting (or joining) Ray the same way for every command that uses it."""

from __future__ import annotations


def init_ray(address: str | None = None) -> None:
    """Join the cluster at ``address`` (``auto`` on a node of it), or start Ray on this machine.

    Ray starts without its dashboard (nothing listens on a public port); its workers run
    :func:`raytrain_at.training.launch.quiet_ray_internals` to silence the warnings that causes.
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=True,
             ignore_reinit_error=True,
             runtime_env={"worker_process_setup_hook":
                          "raytrain_at.training.launch.quiet_ray_internals"})
