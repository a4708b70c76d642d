"""Let a DMS model finish dummy-weight init (synthetic calibrated checkpoints).

``--load-format dummy`` fills weights uniformly in +-1e-3, which makes DMS decisions meaningless.
After the stock loader runs, a model that defines ``dms_after_dummy_weights()`` gets to overwrite
the few weights that make its decisions text-dependent. Inert for every other model.
"""
from __future__ import annotations

_MARK = "_vllm_dms_wrapped"


def check() -> None:
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    from vllm_dms.patches import require_params
    orig = DummyModelLoader.load_weights
    if not getattr(orig, _MARK, False):
        require_params(orig, ("self", "model", "model_config"), "DummyModelLoader.load_weights")


def apply() -> None:
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader
    orig = DummyModelLoader.load_weights
    if getattr(orig, _MARK, False):
        return

    def load_weights(self, model, model_config):
        orig(self, model, model_config)
        hook = getattr(model, "dms_after_dummy_weights", None)
        if hook is not None:
            hook()

    setattr(load_weights, _MARK, True)
    DummyModelLoader.load_weights = load_weights
