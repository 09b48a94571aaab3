"""The URL policy: which image references are fetched, from where, and with the Label Studio key or not.

Pure rules, no I/O: :meth:`UrlPolicy.classify` turns a task's reference (or a redirect's ``Location``)
into a :class:`Target` or refuses it (rules 1-4 of :mod:`backend.images`), and
:meth:`UrlPolicy.check_addresses` decides which of the addresses a name resolved to may be connected to
(rule 3). :mod:`backend.images.http` does the lookup and the connection, to the checked addresses only.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from backend.images.errors import CLOUD_SCHEMES, CONTROL, ImageError, display, shorten

MAX_REF_CHARS = 8192
"""The longest reference accepted."""

_PRESIGN_PATH = re.compile(r"/tasks/\d+/(?:presign|resolve)/?")
# percent-encodes what http.client refuses in a request line (spaces, non-ASCII), keeping escapes as sent
_URL_SAFE = "!$%&'()*+,/:;=?@~[]"
_MEDIA_ROUTES = "(/data/upload/, /data/local-files/?d=, /tasks/<id>/presign/)"

_ALWAYS_REFUSED = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI instance metadata
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "192.0.0.192",  # Oracle Cloud legacy metadata
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Address: TypeAlias = tuple[int, tuple[Any, ...]]
"""``(family, sockaddr)`` as ``socket.getaddrinfo`` gives them."""


@dataclass(frozen=True)
class Target:
    """A reference that passed rules 1-4, ready to request."""

    url: str  # absolute, as classified (for urljoin and messages)
    tls: bool
    host: str  # lower-case, IDNA, no brackets, no trailing dot
    port: int
    host_header: str
    request_path: str  # path and query, percent-encoded, no fragment
    label_studio: bool  # the key goes only to these


@dataclass(frozen=True)
class HostEntry:
    """One ``ALLOWED_IMAGE_HOSTS`` entry: a name or address, with or without a port."""

    host: str
    port: int | None
    ip: IPAddress | None


@dataclass(frozen=True)
class LabelStudioOrigin:
    """Where ``LABEL_STUDIO_URL`` points: the only origin that gets the key."""

    url: str  # as configured, without a trailing slash
    scheme: str
    host: str
    port: int
    base: str  # path prefix without a trailing slash ("" at the root)
    explicit_port: bool

    @classmethod
    def parse(cls, url: str) -> LabelStudioOrigin:
        """Parse ``LABEL_STUDIO_URL``.

        Raises:
            ImageError: ``config`` for anything but a plain http(s)://host[:port][/path] URL.
        """
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname or "@" in parts.netloc or parts.query or parts.fragment or port == -1:
            raise ImageError(
                "config",
                f"LABEL_STUDIO_URL {display(url)!r} is not a plain http(s)://host[:port][/path] URL; set it "
                "to the address this backend reaches Label Studio at.",
            )
        scheme = parts.scheme.lower()
        try:
            host = idna(parts.hostname)
        except ImageError as exc:
            raise ImageError("config", f"LABEL_STUDIO_URL: {exc}") from None
        ip = parse_ip(host)
        return cls(
            url=url.rstrip("/"),
            scheme=scheme,
            host=str(ip) if ip else host,
            port=port or default_port(scheme),
            base=parts.path.rstrip("/"),
            explicit_port=port is not None,
        )

    def target(self, path: str) -> Target:
        """An API route of this Label Studio (``/api/token/refresh/``), which no task reference reaches."""
        bracketed = f"[{self.host}]" if ":" in self.host else self.host
        return Target(
            url=f"{self.url}{path}",
            tls=self.scheme == "https",
            host=self.host,
            port=self.port,
            host_header=f"{bracketed}:{self.port}" if self.explicit_port else bracketed,
            request_path=f"{self.base}{path}",
            label_studio=True,
        )


class UrlPolicy:
    """Rules 1-4 for references and rule 3 for addresses, from the settings that shape them.

    Args:
        allowed_image_hosts: ``ALLOWED_IMAGE_HOSTS`` entries.
        label_studio_url: ``LABEL_STUDIO_URL``, or None.

    Raises:
        ImageError: ``config`` for an unusable ``LABEL_STUDIO_URL`` or ``ALLOWED_IMAGE_HOSTS`` entry.
    """

    def __init__(self, allowed_image_hosts: Iterable[str], label_studio_url: str | None) -> None:
        self.allowed = tuple(parse_host_entry(e) for e in allowed_image_hosts)
        self.label_studio = LabelStudioOrigin.parse(label_studio_url) if label_studio_url else None

    def classify(self, ref: object) -> Target:
        """The target a reference names (rules 1, 2 and 4; rule 3's host check).

        Raises:
            ImageError: ``scheme``, ``path``, ``host`` or ``config``.
        """
        if isinstance(ref, str):
            ref = ref.strip()
        if not isinstance(ref, str) or not ref:
            raise ImageError(
                "scheme",
                "The task gives no image reference; its image field must hold a Label Studio upload "
                "or local-files path or an http(s) URL.",
            )
        if CONTROL.search(ref) or "\\" in ref:
            raise ImageError(
                "path", f"The image reference {display(ref)!r} holds a backslash or control character."
            )
        if ref.startswith("/") and not ref.startswith("//"):
            if not is_media_route(*_split_path_query(ref)):
                raise ImageError(
                    "scheme",
                    f"The image reference {display(ref)!r} is neither a Label Studio media path "
                    f"{_MEDIA_ROUTES} nor an http(s) URL; local files are not read, import them into "
                    "Label Studio.",
                )
            if self.label_studio is None:
                raise ImageError(
                    "config",
                    f"The image {display(ref)!r} is a Label Studio path but LABEL_STUDIO_URL is not set; "
                    "set it to the address this backend reaches Label Studio at.",
                )
            ref = self.label_studio.url + ref
        try:
            parts = urlsplit(ref)
        except ValueError:
            raise ImageError("host", f"The image URL {display(ref)!r} cannot be parsed.") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise scheme_error(ref, scheme)
        if len(ref) > MAX_REF_CHARS:
            raise ImageError("path", f"The image URL is longer than {MAX_REF_CHARS} characters.")
        if "@" in parts.netloc:
            raise ImageError(
                "host",
                f"The image URL {display(ref)!r} carries credentials (user@host); they are not sent, "
                "remove them from the URL.",
            )
        try:
            port = parts.port
        except ValueError:
            raise ImageError("host", f"The image URL {display(ref)!r} has an invalid port.") from None
        if not parts.hostname:
            raise ImageError("host", f"The image URL {display(ref)!r} has no host.")
        host = idna(parts.hostname)
        ip = parse_ip(host)
        host = str(ip) if ip else host
        port = port or default_port(scheme)
        if unsafe_path(parts.path):
            raise ImageError(
                "path",
                f"The image path in {display(ref)!r} climbs out of its folder ('..') or holds a "
                "backslash; give the file's own path.",
            )
        ls = self.label_studio
        label_studio = ls is not None and (scheme, host, port) == (ls.scheme, ls.host, ls.port)
        if ls is not None and label_studio:
            rest = parts.path[len(ls.base) :] if parts.path.startswith(ls.base + "/") else ""
            if not is_media_route(rest, parts.query):
                raise ImageError(
                    "path",
                    f"The URL {display(ref)!r} is on Label Studio but not one of its media routes "
                    f"{_MEDIA_ROUTES}; the API key is only sent to those.",
                )
        elif not any(e.host == host and e.port in (None, port) for e in self.allowed):
            raise ImageError(
                "host",
                f"The image host {host}:{port} is not in ALLOWED_IMAGE_HOSTS; add '{host}' or "
                f"'{host}:{port}' there if images may come from it, or import them into Label Studio.",
            )
        request_path = quote(parts.path or "/", safe=_URL_SAFE)
        if parts.query:
            request_path += "?" + quote(parts.query, safe=_URL_SAFE)
        bracketed = f"[{host}]" if ":" in host else host
        return Target(
            url=ref,
            tls=scheme == "https",
            host=host,
            port=port,
            host_header=bracketed if parts.port is None else f"{bracketed}:{port}",
            request_path=request_path,
            label_studio=label_studio,
        )

    def check_addresses(self, target: Target, infos: Sequence[tuple[Any, ...]]) -> list[Address]:
        """The addresses of ``target``'s host that may be connected to (rule 3), from ``getaddrinfo``.

        Raises:
            ImageError: ``address`` when one is link-local or a metadata service, or none is
                allowed; ``host`` when the name has no IPv4 or IPv6 address.
        """
        good: list[Address] = []
        seen: set[str] = set()
        refused: list[tuple[IPAddress, str]] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if always_refused(ip):
                raise ImageError(
                    "address",
                    f"{_subject(target, ip)} a link-local or cloud-metadata address, which is never "
                    "fetched; serve the image from another host.",
                )
            what = None if target.label_studio else kind(ip)
            if what is None or self._address_listed(ip, target.port):
                if str(ip) not in seen:
                    seen.add(str(ip))
                    good.append((family, tuple(sockaddr)))
            else:
                refused.append((ip, what))
        if not good:
            if not refused:
                raise ImageError("host", f"The image host {target.host} has no IPv4 or IPv6 address.")
            ip, what = refused[0]
            bracketed = f"[{ip}]" if ip.version == 6 else str(ip)
            raise ImageError(
                "address",
                f"{_subject(target, ip)} a {what} address; list '{bracketed}:{target.port}' in "
                "ALLOWED_IMAGE_HOSTS as well if this server is meant to be reached.",
            )
        return good

    def _address_listed(self, ip: IPAddress, port: int) -> bool:
        return any(e.ip is not None and e.ip in embedded(ip) and e.port in (None, port) for e in self.allowed)


def is_media_route(path: str, query: str) -> bool:
    """True for Label Studio's upload, local-files and presign/resolve routes (relative to its base).

    Raises:
        ImageError: ``path`` for a local-files ``d=`` that is absolute or climbs out of the root.
    """
    if path.startswith("/data/upload/") and len(path) > len("/data/upload/"):
        return True
    if path in ("/data/local-files", "/data/local-files/"):
        values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "d"]
        if len(values) != 1 or not values[0]:
            return False
        d = values[0]
        if unsafe_path(d) or unquote(d).startswith("/") or re.match(r"[A-Za-z]:", unquote(d)):
            raise ImageError(
                "path",
                f"The local-files path d={shorten(d)!r} is absolute or climbs out of the document "
                "root ('..'); give the path relative to LOCAL_FILES_DOCUMENT_ROOT.",
            )
        return True
    return bool(_PRESIGN_PATH.fullmatch(path)) and "fileuri=" in query


def unsafe_path(text: str) -> bool:
    """True for ``..`` segments, backslashes or control characters, also under percent-encoding."""
    for _ in range(4):
        if "\\" in text or CONTROL.search(text) or ".." in text.split("/"):
            return True
        decoded = unquote(text)
        if decoded == text:
            return False
        text = decoded
    return True  # encoded four times over: no real file name looks like that


def idna(host: str) -> str:
    """A host name in lower-case ASCII (IDNA), without a trailing dot.

    Raises:
        ImageError: ``host`` for a name IDNA cannot encode.
    """
    host = host.strip().lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise ImageError("host", f"The host name {shorten(host)!r} is not a valid domain name.") from None


def parse_ip(host: str) -> IPAddress | None:
    """The address ``host`` spells, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def embedded(ip: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address it carries (mapped, NAT64, 6to4, Teredo, compatible)."""
    found: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip.teredo is not None:
            found.extend(ip.teredo)
        if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def always_refused(ip: IPAddress) -> bool:
    """Link-local or a cloud metadata service, also when embedded: never fetched, even when listed."""
    return any(a in _ALWAYS_REFUSED or a.is_link_local for a in embedded(ip))


def kind(ip: IPAddress) -> str | None:
    """None for a public unicast address, else what it is (loopback, private, ...)."""
    for a in embedded(ip):
        if a.is_loopback:
            return "loopback"
        if a.is_unspecified:
            return "unspecified"
        if a.is_multicast:
            return "multicast"
        if a.is_reserved:
            return "reserved"
        if a.is_private:
            return "private"
        if not a.is_global:
            return "non-public"
    return None


def parse_host_entry(entry: str) -> HostEntry:
    """One ``ALLOWED_IMAGE_HOSTS`` entry.

    Raises:
        ImageError: ``config`` for anything but a host name or address with an optional port.
    """
    text = entry.strip().lower()
    bad = ImageError(
        "config",
        f"ALLOWED_IMAGE_HOSTS holds {shorten(entry)!r}; entries are host names or addresses with an "
        "optional port, such as images.example.org, 10.0.0.5:8080 or [::1]:8080, without scheme or path.",
    )
    if not text or any(c in text for c in "/@?#\\ ") or CONTROL.search(text):
        raise bad
    port_text: str | None = None
    if text.startswith("["):
        match = re.fullmatch(r"\[([0-9a-f:.]+)\](?::(\d+))?", text)
        if match is None:
            raise bad
        host, port_text = match.group(1), match.group(2)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text  # a name, an IPv4 address or a bare IPv6 address
    if port_text is not None and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise bad
    try:
        host = idna(host)
    except ImageError:
        raise bad from None
    if not host:
        raise bad
    ip = parse_ip(host)
    if ip is None and ":" in host:
        raise bad
    return HostEntry(host=str(ip) if ip else host, port=int(port_text) if port_text else None, ip=ip)


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def scheme_error(ref: str, scheme: str) -> ImageError:
    """Rule 4's refusal, with what to do instead for cloud storage and local paths."""
    if scheme in CLOUD_SCHEMES:
        return ImageError(
            "scheme",
            f"Images on {scheme}:// are not fetched directly; connect the bucket to the project as Label "
            "Studio cloud storage with presigned URLs (tasks then carry /tasks/<id>/presign/ links) and "
            "add the storage host to ALLOWED_IMAGE_HOSTS.",
        )
    if not scheme or ref.startswith("//") or re.fullmatch(r"[a-z]", scheme):  # C:\... is a drive
        return ImageError(
            "scheme",
            f"The image reference {display(ref)!r} is not a URL; local files are not read, import them "
            "into Label Studio or serve them from a host in ALLOWED_IMAGE_HOSTS.",
        )
    return ImageError(
        "scheme",
        f"The image URL scheme {scheme!r} is not allowed; use an http(s) URL from a host in "
        "ALLOWED_IMAGE_HOSTS or a Label Studio media path.",
    )


def refused_redirect(source: Target, location: str, exc: ImageError) -> ImageError:
    """Rule 5: a redirect whose target the rules refuse, with the target's own reason."""
    hint = ""
    if source.label_studio and "/user/login" in location:
        hint = " Label Studio sent its login page: check LABEL_STUDIO_API_KEY."
    return ImageError(
        "redirect",
        f"The image at {display(source.url)!r} redirected to {display(location)!r}, which is refused "
        f"({exc.reason}): {exc}{hint}",
    )


def _subject(target: Target, ip: IPAddress) -> str:
    if target.host == str(ip):
        return f"The address {ip} is"
    return f"The host {target.host} resolves to {ip},"


def _split_path_query(ref: str) -> tuple[str, str]:
    path, _, query = ref.partition("?")
    return path, query.partition("#")[0]
