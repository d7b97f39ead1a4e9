"""The pipeline's stages: one module each, one ``run(cfg, workdir) -> summary`` per module.

A stage reads earlier stages' artifacts from the work directory (paths in ``sigma_jax.workdir``),
calls the library, and writes its own artifacts. ``sigma_jax.pipeline`` lists the stages in run
order. Stage modules import the library; nothing in the library imports a stage.
"""
