"""Image URLs in `/v1/embeddings` (`vlkit serve --allow-url-images`; off by default).

`fetch_image(url, ...)` resolves the host, refuses it unless every address it resolves to is public (no loopback,
private, link-local, shared, reserved, multicast or unspecified address, IPv4-mapped ones unwrapped), connects to
the address it checked (so a second lookup cannot swap it), and follows at most `MAX_REDIRECTS` redirects, checking
each hop the same way. The body is read up to `max_bytes` (413 beyond) within `timeout` seconds overall (408).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from ..errors import RequestError

MAX_REDIRECTS = 3
CHUNK = 64 * 1024


def public_address(address: str) -> bool:
    """True for a globally routable unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_global and not ip.is_multicast)


class _Pinned(http.client.HTTPConnection):
    """HTTP to `host` at an address already checked."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self):
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def _checked_address(host: str, port: int, allow: Callable[[str], bool]) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RequestError(f"image URL host {host!r} does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    refused = [a for a in addresses if not allow(a)]
    if not addresses or refused:
        raise RequestError(
            f"image URL host {host!r} resolves to a loopback, private or otherwise non-public address "
            f"({', '.join(refused) or 'none'}); refused",
            status=403,
        )
    return addresses[0]


def fetch_image(
    url: str, *, max_bytes: int, timeout: float = 10.0, allow: Callable[[str], bool] = public_address
) -> bytes:
    """The bytes at `url` (http or https), every hop's addresses checked by `allow` (tests pass their own)."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestError(f"image URL {url[:200]!r}: give an http(s) URL or a data:image/...;base64, URI")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise RequestError(f"image URL {url[:200]!r} has a bad port") from None
        address = _checked_address(parts.hostname, port, allow)
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestError(f"image URL not fetched within {timeout:g} s", status=408)
        cls = _PinnedTLS if parts.scheme == "https" else _Pinned
        conn = cls(parts.hostname, port, address, left)
        try:
            conn.request(
                "GET",
                (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                headers={"User-Agent": "vlkit-serve", "Accept": "image/*"},
            )
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("location"):
                url = urljoin(url, resp.getheader("location", ""))
                continue
            if resp.status != 200:
                raise RequestError(f"image URL answered HTTP {resp.status}")
            declared = resp.getheader("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise RequestError(f"the image at the URL is {int(declared):,} bytes, over {max_bytes:,}", status=413)
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise RequestError(f"image URL not fetched within {timeout:g} s", status=408)
                chunk = resp.read(CHUNK)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(f"the image at the URL is over {max_bytes:,} bytes", status=413)
                chunks.append(chunk)
        except (OSError, http.client.HTTPException) as exc:
            raise RequestError(f"image URL could not be fetched: {type(exc).__name__}: {exc}"[:300]) from None
        finally:
            conn.close()
    raise RequestError(f"image URL redirected more than {MAX_REDIRECTS} times")
