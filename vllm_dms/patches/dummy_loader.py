"""Let a DMS model finish dummy-weight init (synthetic calibrated checkpoints).

``--load-format dummy`` fills weights uniformly in +-1e-3, which makes DMS decisions meaningless.
After the stock loader runs, a model that defines ``dms_after_dummy_weights()`` gets to overwrite
the few weights that make its decisions text-dependent. Inert for every other model.
"""
from __future__ import annotations

import inspect

_MARK = "_vllm_dms_wrapped"


def apply() -> None:
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader
    orig = DummyModelLoader.load_weights
    if getattr(orig, _MARK, False):
        return
    params = list(inspect.signature(orig).parameters)
    if params[:3] != ["self", "model", "model_config"]:
        raise RuntimeError(f"vllm_dms: DummyModelLoader.load_weights{params} changed; "
                           "this vLLM is not the 0.26.0 the plugin was built for")

    def load_weights(self, model, model_config):
        orig(self, model, model_config)
        hook = getattr(model, "dms_after_dummy_weights", None)
        if hook is not None:
            hook()

    setattr(load_weights, _MARK, True)
    DummyModelLoader.load_weights = load_weights
