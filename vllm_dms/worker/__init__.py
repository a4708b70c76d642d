"""Worker side of the plugin: the attention backend, the per-engine runtime, the DMS model
transform (models/) and the Triton kernels (kernels/)."""
