"""Where an API key may go: checked before any connection is opened.

A configuration can come from someone else, and it names both the server (``base_url``) and
the environment variable whose value is sent to it as the key (``api_key_env``). So a key
leaves this machine only where the user said it may:

- over plain ``http://`` only to a loopback address (``localhost``, ``127.0.0.0/8``, ``::1``);
- ``$OPENAI_API_KEY`` to OpenAI's API (``https://api.openai.com``, the default server) as it
  is;
- any other variable, or to any other host (loopback included), only when the user allows
  that host on the command line (``--allow-host HOST``, repeatable) or in the environment
  (``MISALIGN_ALLOW_HOSTS``, comma-separated): never because a configuration says so.

A request without a key (``api_key_env = ""``, as the local model's server takes) needs no
permission: it carries nothing of the user's. What the ``openai`` SDK would add from the
environment on its own (``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``, the headers of
``OPENAI_CUSTOM_HEADERS``) goes to OpenAI's host only (``ambient_headers``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from urllib.parse import urlsplit

from misalign.config import ConfigError

OPENAI = "api.openai.com"
"""The host of OpenAI's API, the default server: ``$OPENAI_KEY_ENV`` goes there over https."""
OPENAI_URL = f"https://{OPENAI}/v1"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
ENV = "MISALIGN_ALLOW_HOSTS"
"""The environment variable of hosts a key may go to, comma-separated."""


def allowed_hosts(flags: Iterable[str] = ()) -> frozenset[str]:
    """The hosts a key may go to: those given (``--allow-host``) and those in
    ``$MISALIGN_ALLOW_HOSTS``, lower-cased (``host`` or ``host:port``)."""
    named = [*flags, *os.environ.get(ENV, "").split(",")]
    return frozenset(host.strip().lower() for host in named if host.strip())


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback: ``localhost`` or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_destination(field: str, base_url: str | None, key_env: str, allowed: frozenset[str]):
    """Refuse to send the key in ``$key_env`` to ``base_url`` unless it may go there.

    Args:
        field: the agent's configuration path (``agents.A``), for the message.
        base_url: the server (``None``: OpenAI's).
        key_env: the variable holding the key ('': no key is sent).
        allowed: the hosts the user allowed (``allowed_hosts``).

    Raises:
        ConfigError: one line naming the host and how to allow it: ``base_url`` is not an
            http(s) URL with a host, or a key would go over plain http to another machine,
            or to a host other than OpenAI's that the user did not allow.
    """
    url = base_url or OPENAI_URL
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is not a number, a bad IPv6 literal
        raise ConfigError(f"{field}.base_url: not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{field}.base_url: not an http:// or https:// URL with a host")
    if not key_env:
        return
    held = f"the key in ${key_env}"
    if parts.scheme == "http" and not is_loopback(host):
        raise ConfigError(
            f"{field}.base_url: {held} would go to {host} over plain http://; a key is sent "
            "unencrypted only to a loopback address (use https://)"
        )
    if host == OPENAI and parts.scheme == "https" and key_env == OPENAI_KEY_ENV:
        return
    if host in allowed or (port is not None and f"{host}:{port}" in allowed):
        return
    why = f"only ${OPENAI_KEY_ENV} goes there unasked" if host == OPENAI else "not allowed"
    raise ConfigError(
        f"{field}.base_url: {held} would go to {host} ({why}); if you trust it with that "
        f"variable, run with --allow-host {host} (or set {ENV}={host})"
    )


def ambient_headers(base_url: str | None) -> dict:
    """Headers to send in place of those the ``openai`` SDK reads from the environment on its
    own: none for OpenAI's host (``{}``: the SDK's own), and for any other host ``Omit`` for
    ``OpenAI-Organization``, ``OpenAI-Project`` and each header named in
    ``OPENAI_CUSTOM_HEADERS``, so that nothing of the user's environment goes there unasked."""
    if urlsplit(base_url or OPENAI_URL).hostname == OPENAI:
        return {}
    from openai import Omit

    names = {"OpenAI-Organization", "OpenAI-Project"}
    for line in os.environ.get("OPENAI_CUSTOM_HEADERS", "").split("\n"):
        if ":" in line:
            names.add(line.split(":", 1)[0].strip())
    return dict.fromkeys(names, Omit())
