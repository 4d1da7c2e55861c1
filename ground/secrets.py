"""Secret settings: the value itself (from the environment), or the name of a Prefect Secret block.

``EMBED_FACTORY_LLM__API_KEY=prefect-secret:vllm-api-key`` makes the factory read the key from the
Prefect Secret block ``vllm-api-key`` when it needs it (create one with
``prefect block create secret`` or ``Secret(value=...).save("vllm-api-key")``), so the key lives in
Prefect's store and not in a shell profile or a compose file. Either way the value stays a
``SecretStr`` in the settings object and is revealed only where it is sent.
"""

from __future__ import annotations

from pydantic import SecretStr

BLOCK_PREFIX = "prefect-secret:"


class SecretBlockError(ValueError):
    """A secret setting names a Prefect Secret block that cannot be read."""


def reveal(secret: SecretStr | str | None) -> str | None:
    """The secret's value; ``prefect-secret:<name>`` is read from that Prefect Secret block."""
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    if not value or not value.startswith(BLOCK_PREFIX):
        return value
    name = value[len(BLOCK_PREFIX) :].strip()
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(name, _sync=True).get())  # sync even inside a flow's event loop
    except (ValueError, RuntimeError) as exc:  # Prefect: "Unable to find block document named …"
        raise SecretBlockError(f"cannot read the Prefect Secret block {name!r}: {str(exc).splitlines()[0]}") from None
