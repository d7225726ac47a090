"""Pipeline stages, one module each, run by `pipeline.runner` in `STAGE_ORDER`."""
