"""Engine-core side of the plugin: the checkpoint config, the KV-cache spec, the arena layout and
reservation, the ledger and scheduler, prefix entries, request validation, metrics, and the
step-message types the scheduler and the worker exchange."""
