"""Who may drive the viewer: view.py's page and websocket refuse other web pages, and other machines without a token.

viser (the web viewer under nerfstudio) serves its page and its websocket on one port and checks no Origin, so any
web page open in the user's browser could connect to ws://localhost:8080 and drive renders, and with --host 0.0.0.0
anyone on the network could. The gate, run on each HTTP request and websocket handshake before viser sees it:
- a websocket whose Origin is another site than the page's own (the Host it asked) is refused;
- served on localhost (the default), a request must name a loopback Host, so that a site whose name was pointed at
  127.0.0.1 (DNS rebinding) is refused too;
- served on any other address, every request needs the token printed at start: the page is opened as
  http://HOST:PORT/?token=T, which sets a cookie for the page's own requests and its websocket (viser's page drops
  the URL's query when it connects).
Installed around websockets' `serve`, for the server a Viewer starts (viser offers no hook of its own).
"""
import contextlib
import hmac
import http
import ipaddress
import secrets
import threading
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

COOKIE = "gqn_viewer_token"
LOCAL = ("localhost", "127.0.0.1", "::1")
_lock = threading.Lock()   # held while a Viewer's server starts: the gate it sets is that server's
_pending = None            # the gate of the server starting now
_original = None           # websockets' own serve


def is_local(host):
    """Whether --host serves this machine only (then no token is asked)."""
    return host in LOCAL


def new_token(host):
    """A token for --host, or None where none is needed."""
    return None if is_local(host) else secrets.token_urlsafe(16)


def _loopback(name):
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Gate:
    """The checks for one server: `token` None (served on localhost) or the string each request must carry."""

    def __init__(self, token):
        self.token = token

    def refusal(self, request):
        """An HTTP request or websocket handshake -> None to let it through, or why it is refused."""
        headers = request.headers
        host = headers.get("Host", "")
        origin = headers.get("Origin")
        if headers.get("Upgrade", "").lower() == "websocket" and origin is not None \
                and urlsplit(origin).netloc.lower() != host.lower():
            return f"a websocket from another site ({origin}) may not drive this viewer"
        if self.token is None:
            return None if _loopback(urlsplit(f"//{host}").hostname or "") else \
                f"this viewer serves localhost only, not {host}"
        given = parse_qs(urlsplit(request.path).query).get("token", [None])[0]
        cookie = SimpleCookie(headers.get("Cookie", "")).get(COOKIE)
        for candidate in (given, cookie.value if cookie else None):
            if candidate and hmac.compare_digest(candidate, self.token):
                return None
        return "this viewer needs the token it printed at start: open the address it printed"

    def wrap(self, process_request):
        """viser's request handler -> the same behind the gate (a refused request gets 403 and one line)."""
        def gated(connection, request):
            why = self.refusal(request)
            if why is not None:
                return connection.respond(http.HTTPStatus.FORBIDDEN, why + "\n")
            response = process_request(connection, request) if process_request else None
            if response is not None and self.token is not None and "token=" in request.path:
                response.headers["Set-Cookie"] = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
            return response
        return gated


def _serve(handler, host=None, port=None, *, process_request=None, **kwargs):
    if _pending is not None:
        process_request = _pending.wrap(process_request)
    return _original(handler, host, port, process_request=process_request, **kwargs)


@contextlib.contextmanager
def gated(gate):
    """Within: a websockets server started meanwhile runs `gate` first (viser starts its server in a thread of its
    own as the ViserServer is made, and waits until it serves)."""
    global _original, _pending
    import websockets.asyncio.server as ws

    with _lock:
        if _original is None:
            _original, ws.serve = ws.serve, _serve
        _pending = gate
        try:
            yield
        finally:
            _pending = None
