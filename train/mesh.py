"""Multi-host setup for the trainer (the mesh itself is built in ``lora_one_jax.sharding``)."""

from __future__ import annotations


def setup_distributed(cfg) -> None:
    """Call ``jax.distributed.initialize`` when ``mesh.distributed`` is set (once per process, first thing)."""
    if not cfg.mesh.distributed:
        return
    import jax

    # CPU hosts (and tests with several local processes) talk through gloo; accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {
        k: v
        for k, v in (
            ("coordinator_address", cfg.mesh.coordinator_address),
            ("num_processes", cfg.mesh.num_processes),
            ("process_id", cfg.mesh.process_id),
        )
        if v is not None
    }
    jax.distributed.initialize(**kwargs)
