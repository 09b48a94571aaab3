"""Fetch and decode one task image: the only way an image enters the backend.

``/predict`` calls :meth:`ImageFetcher.fetch` once per task image. The reference comes from task data,
which any annotator who can import tasks controls, so this module is the backend's SSRF and
decompression-bomb surface, and it is strict. Every refusal raises :class:`ImageError`, whose ``reason``
is a short stable code and whose message says what is wrong and what to do.

Rules, and why:

1. **Label Studio references.** ``/data/upload/...``, ``/data/local-files/?d=...`` and Label Studio's
   cloud-storage links ``/tasks/<id>/presign/?fileuri=...`` (or ``/resolve/``) are fetched from
   ``settings.label_studio_url``, as are absolute URLs whose scheme, host and port equal it (their path
   must be one of those media routes too). Only these routes get the API key: the key opens the whole
   Label Studio API, and a task must not make the backend call ``/api/...`` with it. The ``hostname``
   that ``/setup`` sends is deliberately not used: whoever can reach ``/setup`` would choose where the key
   goes. Without ``LABEL_STUDIO_URL`` (or the key) these references fail with ``config``. ``..``
   segments, also percent-encoded (once or more) and inside the ``d=`` value, absolute ``d=`` values,
   backslashes and control characters fail with ``path``.
2. **Auth, only ever to the Label Studio origin.** A legacy token is sent as ``Authorization: Token <key>``. A
   personal access token (a JWT: three dot-separated parts) is exchanged at
   ``POST /api/token/refresh/`` for an access token (valid 300 s in Label Studio 1.23), cached for
   :data:`ACCESS_TOKEN_TTL` seconds and sent as ``Authorization: Bearer <access>``; a 401 refreshes it
   once and retries. Neither the key nor a token is ever logged or put in a message.
3. **Other http(s) URLs** need their host in ``settings.allowed_image_hosts``: an entry ``host`` admits
   any port, ``host:port`` only that port (checked before any DNS lookup). The name is then resolved once
   and every address is checked. Link-local addresses (169.254.0.0/16, fe80::/10) and cloud metadata
   services (169.254.169.254, fd00:ec2::254, 100.100.100.200, 192.0.0.192) are refused always, even when
   listed, also when embedded in IPv6 (``::ffff:a.b.c.d``, NAT64, 6to4, Teredo). Loopback, private,
   shared, reserved, multicast and unspecified addresses are refused unless the allow list names that
   *address* (``127.0.0.1`` or ``127.0.0.1:8080``): a listed name alone does not vouch for where it
   resolves, so an internal server listed by name needs its address listed as well. The connection then
   goes to the checked address itself (TLS still verifies the certificate for the name), so DNS
   rebinding between the check and the connection is not possible. Residual risks: the check trusts
   the system resolver's answer once, and name resolution is bounded by the resolver's own timeout, not
   by ``image_timeout``; ``HTTP_PROXY``/``HTTPS_PROXY`` are not honoured, since a proxy would resolve
   the name again.
4. **Every other reference is refused** with ``scheme``: ``file:``, ``gopher:``, ``ftp:``, ``data:``,
   protocol-relative ``//host/...``, bare filesystem paths, empty strings and non-strings. ``s3://``,
   ``gs://`` and ``azure-blob://`` are refused too: cloud storage must reach the backend through Label
   Studio, presigned (see rule 1), with the storage host in the allow list.
5. **Redirects** are never followed automatically. At most :data:`MAX_REDIRECTS` are followed by hand,
   and each ``Location`` goes through rules 1-4 again: a redirect to a metadata address, to ``file:``
   or to a host not listed fails with ``redirect`` (the message gives the target's own reason). Whether
   a hop carries the key is decided per hop by rule 1, so it never reaches another host, not even
   another port of the same host.
6. **Limits.** ``settings.image_timeout`` bounds the whole fetch (connections, token refresh, redirects
   and reading; a watchdog closes the socket at the deadline, so a server dripping bytes cannot stretch
   it): ``timeout``. A ``Content-Length`` above ``settings.max_image_bytes`` is refused before reading,
   and the body is read in chunks and dropped once it passes the limit: ``too_large``. No body:
   ``empty``; any status but 200 (after redirects): ``http_status`` (``.status`` holds it); network and
   TLS failures: ``connection``. Decoding only accepts :data:`FORMATS` (Pillow's other plugins include
   PostScript, which runs Ghostscript). The header is read first and ``width * height`` checked against
   ``settings.max_image_pixels`` before any pixel is allocated: ``too_many_pixels``. Pillow's own
   ``DecompressionBombError`` (above twice ``PIL.Image.MAX_IMAGE_PIXELS``) and its warning, when warnings
   are errors as under pytest, map to ``too_many_pixels`` as well; Pillow's global limit is not changed,
   since it belongs to the whole process. Keep ``MAX_IMAGE_PIXELS`` below Pillow's 89,478,485 to
   avoid its warning. Then the image is fully decoded, so a truncated file fails here (``truncated``)
   and a corrupt or unknown one too (``not_an_image``), never later inside the model.
7. **Orientation and colour.** EXIF orientation is applied (``ImageOps.exif_transpose``), because
   browsers apply it when Label Studio shows the image, so masks line up with what annotators see;
   ``width`` and ``height`` are after it. The result is RGB: transparency is composited onto white,
   palette and grey images are expanded, and 16-bit images are scaled by 1/257 (Pillow's own conversion
   clips them to 255). ICC profiles are not applied.
8. **Cache by content.** Decoded images are kept in an LRU keyed by the SHA-256 of the file bytes, never
   by URL: the same bytes under two URLs decode once, and a URL whose file changed is never served stale
   (the label-studio-tools bug). Bytes are still downloaded each time, since they are what the key is
   computed from. Each call returns its own copy of the image, so a caller that edits it cannot corrupt
   the cache. The fetcher is thread-safe.

Where each part lives:

- :mod:`backend.images.policy`: rules 1-4 as pure functions of the settings (no I/O);
- :mod:`backend.images.http`: the pinned client: one lookup, the checked addresses only, the deadline
  and its watchdog, the size limit (rule 6, the network half);
- :mod:`backend.images.decode`: decoding under the pixel limit, orientation and colour (rules 6 and 7);
- :mod:`backend.images.cache`: the content-keyed cache (rule 8);
- :mod:`backend.images.fetcher`: :class:`ImageFetcher`, which puts them together with redirects (rule 5)
  and the one Label Studio auth, :class:`backend.label_studio.client.LabelStudioAuth` (rule 2).
"""

from backend.images.cache import LoadedImage
from backend.images.decode import FORMATS, decode_image
from backend.images.errors import REASONS, ImageError
from backend.images.fetcher import MAX_REDIRECTS, ImageFetcher
from backend.label_studio.client import ACCESS_TOKEN_LIFETIME_S as ACCESS_TOKEN_TTL

__all__ = [
    "ACCESS_TOKEN_TTL",
    "FORMATS",
    "MAX_REDIRECTS",
    "REASONS",
    "ImageError",
    "ImageFetcher",
    "LoadedImage",
    "decode_image",
]
