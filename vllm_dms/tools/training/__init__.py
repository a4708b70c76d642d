"""DMS retrofit training: ``train.train`` (logit distillation onto the borrowed query lane) and
``delta`` (the compact trained-rows file and the checkpoint rebuilt from it).

Nothing is re-exported here, so ``vllm_dms.tools.training.train`` stays the module, not the
function.
"""
