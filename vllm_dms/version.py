"""Version pins: this package patches vLLM internals, so it runs on exactly one vLLM release."""
__version__ = "0.1.0"

# The patches read/wrap private vLLM shapes; any other release is refused at registration.
REQUIRED_VLLM = "0.26.0"


def vllm_version_ok(found: str) -> bool:
    """True only for the exact release the patches were written against."""
    return found == REQUIRED_VLLM
